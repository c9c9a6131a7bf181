#!/usr/bin/env bash
# bench/suppression.sh: the do-not-contact list at scale, in one run.
#
#   import   ROWS suppressions (NDJSON, one address each) POSTed to the admin API's
#            streamed import: rows/s, the daemon's peak RSS, suppressions.db bytes per entry,
#            and the in-memory index's bytes per entry (from /metrics).
#   intake   SMTP intake (smtp-source, delivery off) against two daemons side by side:
#            one with an empty list, one with the ROWS entries loaded (restarted, so it
#            also loads them at start). The recipient is not on the list: every RCPT pays
#            the door's lookups. Target: loaded / empty >= 0.95.
#
# A benchmark, not a test: it prints figures and fails only when something does not work.
# Needs root (it installs packages). Talks to 127.0.0.1 only.

set -euo pipefail

ROWS=${ROWS:-1000000}
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
IDLE_WAIT=${IDLE_WAIT:-60}
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --rows) ROWS=$2; shift 2 ;;
        -m|--messages) MESSAGES=$2; shift 2 ;;
        --quick) ROWS=100000; MESSAGES=5000; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help)
            echo "Usage: bench/suppression.sh [--rows N] [-m MESSAGES] [--quick] [--no-build] [--keep]"
            exit 0 ;;
        *) echo "suppression.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
for v in ROWS MESSAGES SESSIONS SIZE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "suppression.sh: $v must be a positive integer" >&2; exit 2; }
done

SENDER=bench@client.test
RECIPIENT=user@bench.test
NAME=suppression
TOKEN=bench-admin-token-0123456789abcdef
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
install_prereqs
if [[ $BUILD -eq 1 ]]; then
    build_release
else
    FLOODGATE=$REPO/target/release/floodgate
    [[ -x $FLOODGATE ]] || die "$FLOODGATE missing (run without --no-build)"
fi

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1

# config DIR SMTP_PORT ADMIN_PORT: intake only, admin on a known port.
config() {
    intake_toml "$1" "$2" full >"$1/floodgate.toml"
    # The admin listener on ADMIN_PORT (intake_toml gives both HTTP listeners port 0).
    python3 - "$1/floodgate.toml" "$3" <<'PY'
import sys
path, port = sys.argv[1], sys.argv[2]
text = open(path).read()
head, admin = text.split("[admin]", 1)
admin = admin.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1)
open(path, "w").write(head + "[admin]" + admin + "\n[delivery]\nenabled = false\n")
PY
}

metric() {   # metric ADMIN_PORT NAME
    curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$1/metrics" \
        | awk -v n="$2" '$1 == n { print $2 }'
}

# ---------------------------------------------------------------- import

LOADED=$TMP/loaded
mkdir -p "$LOADED/queue"
free_port; L_SMTP=$PORT
free_port; L_ADMIN=$PORT
config "$LOADED" "$L_SMTP" "$L_ADMIN"
serve_floodgate "$LOADED" "$L_SMTP"
wait_port "$L_ADMIN" "$FG_PID" floodgate "$LOADED/floodgate.log"

log "writing $ROWS NDJSON rows"
python3 - "$TMP/dnc.ndjson" "$ROWS" <<'PY'
import sys
path, rows = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    for i in range(rows):
        f.write('{"address": "person%d@customer%d.example", "reason": "unsubscribed"}\n' % (i, i % 1000))
PY
sync
wait_idle import
log "importing $(du -h "$TMP/dnc.ndjson" | cut -f1) through POST /admin/v1/suppressions/import"
t0=$(date +%s.%N)
curl -sf -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/x-ndjson" \
    --data-binary "@$TMP/dnc.ndjson" "http://127.0.0.1:$L_ADMIN/admin/v1/suppressions/import" \
    >"$TMP/import.json" || die "import failed"
t1=$(date +%s.%N)
accepted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted"])' "$TMP/import.json")
[[ $accepted -eq $ROWS ]] || die "imported $accepted of $ROWS: $(cat "$TMP/import.json")"
RSS_IMPORT=$(awk '/VmHWM/ { print $2 }' "/proc/$FG_PID/status")
IN_MEMORY=$(metric "$L_ADMIN" floodgate_suppressions)
MEM_BYTES=$(metric "$L_ADMIN" floodgate_suppression_memory_bytes)
stop_pid "$FG_PID"
DB_BYTES=$(du -cb "$LOADED/queue"/suppressions.db* | tail -n 1 | cut -f1)
IMPORT_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')

# ---------------------------------------------------------------- intake, side by side

EMPTY=$TMP/empty
mkdir -p "$EMPTY/queue"
free_port; E_SMTP=$PORT
free_port; E_ADMIN=$PORT
config "$EMPTY" "$E_SMTP" "$E_ADMIN"

intake() {   # intake NAME DIR SMTP_PORT: sets MSGS_PER_S
    serve_floodgate "$2" "$3"
    local t0 t1
    sync
    wait_idle "$1"
    t0=$(date +%s.%N)
    smtp-source -d -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f "$SENDER" -t "$RECIPIENT" \
        -M client.test "127.0.0.1:$3" >"$TMP/source-$1.log" 2>&1 || die "smtp-source against $1 failed"
    t1=$(date +%s.%N)
    RSS=$(awk '/VmHWM/ { print $2 }' "/proc/$FG_PID/status")
    stop_pid "$FG_PID"
    local count
    count=$(sqlite3 "$2/queue/queue.db" 'select count(*) from messages')
    [[ $count -eq $MESSAGES ]] || die "$1 queued $count messages, expected $MESSAGES"
    MSGS_PER_S=$(awk -v m="$MESSAGES" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", m / (b - a) }')
    log "$1: $MSGS_PER_S msg/s, peak RSS $RSS KiB"
}

# Alternated, twice each, so drift on a shared machine hits both alike; best of each.
best_empty=0; best_loaded=0
for round in 1 2; do
    intake "empty-$round" "$EMPTY" "$E_SMTP"; (( MSGS_PER_S > best_empty )) && best_empty=$MSGS_PER_S
    RSS_EMPTY=$RSS
    rm -f "$EMPTY/queue/queue.db"*
    intake "loaded-$round" "$LOADED" "$L_SMTP"; (( MSGS_PER_S > best_loaded )) && best_loaded=$MSGS_PER_S
    RSS_LOADED=$RSS
    rm -f "$LOADED/queue/queue.db"*
done

echo
echo "Suppression list: $ROWS entries ($(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
awk -v r="$ROWS" -v s="$IMPORT_S" -v rss="$RSS_IMPORT" -v db="$DB_BYTES" -v n="$IN_MEMORY" -v mem="$MEM_BYTES" 'BEGIN {
    printf "  import: %.2f s, %.0f rows/s; peak RSS %.0f MiB\n", s, r / s, rss / 1024
    printf "  suppressions.db: %.1f MiB, %.0f bytes per entry\n", db / 1048576, db / r
    printf "  in memory: %d entries, index %.1f MiB, %.1f bytes per entry\n", n, mem / 1048576, mem / n
}'
awk -v e="$best_empty" -v l="$best_loaded" -v re="$RSS_EMPTY" -v rl="$RSS_LOADED" -v m="$MESSAGES" 'BEGIN {
    printf "  SMTP intake, %d messages x 2 rounds (best): empty list %d msg/s (RSS %.0f MiB), %s loaded %d msg/s (RSS %.0f MiB)\n", m, e, re / 1024, "list", l, rl / 1024
    printf "  ratio loaded / empty: %.3f (target >= 0.95)\n", l / e
}'
