#!/usr/bin/env bash
# bench/chaos.sh: Floodgate's promise under kill -9, a full disk and a DNS outage.
#
#   1. kill -9 trials: SMTP sessions and an HTTP client (bench/chaosload.py) submit uniquely
#      numbered messages without pause; Floodgate relays them to a receiving SMTP server
#      (bench/chaossink.py, which records each accepted message's number). At a random
#      moment of each trial Floodgate is killed with SIGKILL, `PRAGMA integrity_check` is
#      run on queue.db, and it is restarted on the same queue. After the last trial the
#      clients stop and Floodgate drains the queue. Then: acknowledged numbers never
#      received are lost (must be 0); numbers received more than once are duplicates.
#   2. disk-full drill: a second Floodgate with its queue on a small tmpfs mounted here;
#      the tmpfs is filled; SMTP must answer 452 4.3.1 and HTTP 503; once the filler is
#      removed both accept again, without a restart.
#   3. DNS-outage drill: the nameserver (dnsmasq) is stopped (SIGSTOP: queries time out);
#      every answer at the door must be 4xx (fresh recipient domains, so no cache helps);
#      after SIGCONT, the time until a fresh domain is accepted again.
#
# A benchmark, not a test: it prints figures, and fails only when something does not
# work. Root only (tmpfs). Talks to 127.0.0.1 only; every wait is bounded.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/chaos.sh [options]

  -t, --trials N     kill -9 trials                      (env TRIALS, default 20)
  -s, --sessions N   parallel SMTP sessions              (env SESSIONS, default 4)
      --min-run S    shortest run before a kill, seconds (env MIN_RUN, default 0.5)
      --max-run S    longest run before a kill, seconds  (env MAX_RUN, default 3)
      --no-build     do not run `cargo build --release` first
      --keep         keep the temporary directory (logs, queues, numbers)
  -h, --help         this text
EOF
}

TRIALS=${TRIALS:-20}
SESSIONS=${SESSIONS:-4}
MIN_RUN=${MIN_RUN:-0.5}
MAX_RUN=${MAX_RUN:-3}
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -t|--trials) TRIALS=$2; shift 2 ;;
        -s|--sessions) SESSIONS=$2; shift 2 ;;
        --min-run) MIN_RUN=$2; shift 2 ;;
        --max-run) MAX_RUN=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "chaos.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in TRIALS SESSIONS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 && ${!v} -le 1000 ]] || { echo "chaos.sh: $v must be 1..1000" >&2; exit 2; }
done

NAME=chaos
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FULL_MNT=$TMP/full
chaos_cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    PIDS=()
    mountpoint -q "$FULL_MNT" 2>/dev/null && umount "$FULL_MNT"
    (exit $rc)
    cleanup
}
trap chaos_cleanup EXIT

need_root
for c in dnsmasq sqlite3 python3 mount umount; do
    command -v "$c" >/dev/null || die "$c not found (apt-get install dnsmasq-base sqlite3 python3)"
done
if [[ $BUILD -eq 1 ]]; then build_release; else FLOODGATE=${FLOODGATE:-$REPO/target/release/floodgate}; fi
[[ -x $FLOODGATE ]] || die "$FLOODGATE missing (run without --no-build)"

API_KEY=chaos-bench-key-0123456789
API_SHA=$(printf '%s' "$API_KEY" | sha256sum | cut -d' ' -f1)
LOAD=(python3 "$REPO/bench/chaosload.py")

log "machine: $NPROC x $CPU_MODEL; load average $(cut -d' ' -f1-3 /proc/loadavg) at start"

# ------------------------------------------------------------ DNS and the receiving server

# chaos.test and d0..d299.chaos.test: MX mx.chaos.test, A 127.0.0.1. The numbered domains
# are fresh names for the DNS drill (no cached verdict can answer for them).
{
    echo "host-record=mx.chaos.test,127.0.0.1"
    echo "mx-host=chaos.test,mx.chaos.test,10"
    for i in $(seq 0 299); do echo "mx-host=d$i.chaos.test,mx.chaos.test,10"; done
} >"$TMP/dnsmasq.conf"
start_dnsmasq --conf-file="$TMP/dnsmasq.conf"
free_port; SINK_PORT=$PORT
SINK_OUT=$TMP/received
: >"$SINK_OUT"
: >"$TMP/kills"
python3 "$REPO/bench/chaossink.py" "$SINK_PORT" "$SINK_OUT" 2>"$TMP/sink.err" &
SINK_PID=$!
PIDS+=("$SINK_PID")
wait_port "$SINK_PORT" "$SINK_PID" chaossink "$TMP/sink.err"

write_config() {   # write_config DIR QUEUE_DIR SMTP_PORT HTTP_PORT DELIVERY(true|false)
    cat >"$1/floodgate.toml" <<EOF
[server]
hostname = "chaos.floodgate"
shutdown_grace = "2s"

[smtp]
listen = ["127.0.0.1:$3"]

[http]
listen = "127.0.0.1:$4"

[[http.api_keys]]
name = "chaos"
key_sha256 = "$API_SHA"

[admin]
listen = "127.0.0.1:0"
token = "chaos-bench-admin-token-0123456789"

[queue]
dir = "$2"

[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]
timeout = "500ms"
attempts = 1

[delivery]
enabled = $5
backoff = ["1s"]

$(sink_route "$SINK_PORT")
EOF
}

# start_fg DIR: like lib.sh's start_floodgate, appending to the log across restarts.
start_fg() {
    local dir=$1
    echo "---- start $(date -u +%T.%N)" >>"$dir/floodgate.log"
    "$FLOODGATE" serve --config "$dir/floodgate.toml" 2>>"$dir/floodgate.log" &
    FG_PID=$!
    PIDS+=("$FG_PID")
    local before
    before=$(grep -c 'smtp listening' "$dir/floodgate.log" || true)
    for _ in $(seq 300); do
        [[ $(grep -c 'smtp listening' "$dir/floodgate.log" || true) -gt $before ]] && return
        kill -0 "$FG_PID" 2>/dev/null || { tail -n 30 "$dir/floodgate.log" >&2; die "floodgate exited"; }
        sleep 0.1
    done
    die "floodgate did not start"
}

kill9() {
    kill -9 "$FG_PID" 2>/dev/null || true
    wait "$FG_PID" 2>/dev/null || true
    forget_pid "$FG_PID"
}

# ------------------------------------------------------------ 1. kill -9 trials

FG_DIR=$TMP/floodgate
mkdir -p "$FG_DIR/queue"
free_port; SMTP_PORT=$PORT
free_port; HTTP_PORT=$PORT
write_config "$FG_DIR" "$FG_DIR/queue" "$SMTP_PORT" "$HTTP_PORT" true
Q=$FG_DIR/queue/queue.db
STOP=$TMP/stop
ACKED=$TMP/acked
start_fg "$FG_DIR"
"${LOAD[@]}" load --smtp "$SMTP_PORT" --http "$HTTP_PORT" --key "$API_KEY" \
    --sessions "$SESSIONS" --acked "$ACKED" --stop "$STOP" >"$TMP/load.out" 2>"$TMP/load.err" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
bad_integrity=0
t_start=$(date +%s.%N)
for trial in $(seq "$TRIALS"); do
    run=$(awk -v a="$MIN_RUN" -v b="$MAX_RUN" -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", a + rand() * (b - a) }')
    sleep "$run"
    k0=$(date +%s.%N)
    kill9
    echo "$k0 $(date +%s.%N)" >>"$TMP/kills"
    check=$(sqlite3 "$Q" "PRAGMA integrity_check" 2>&1 | tr '\n' ' ')
    [[ $check == "ok " ]] || bad_integrity=$((bad_integrity + 1))
    received=$(wc -l <"$SINK_OUT")
    log "trial $trial: killed after ${run}s; integrity_check: $check; sink has $received messages"
    start_fg "$FG_DIR"
done
touch "$STOP"
for _ in $(seq 600); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$LOAD_PID" 2>/dev/null && die "the load generator did not stop within 60 s"
wait "$LOAD_PID" || die "the load generator failed: $(tail -n 5 "$TMP/load.err")"
forget_pid "$LOAD_PID"
t_load=$(date +%s.%N)
log "load: $(cat "$TMP/load.out")"
# Drain: every recipient delivered or failed (bounded).
left=1
for _ in $(seq 1200); do
    left=$(sqlite3 "$Q" "SELECT COUNT(*) FROM recipients WHERE state NOT IN (1, 2)" 2>/dev/null || echo 1)
    [[ $left -eq 0 ]] && break
    sleep 0.25
done
[[ $left -eq 0 ]] || die "queue not drained after 300 s: $left recipients left"
sleep 1   # anything still in flight to the sink lands in its file
t_drain=$(date +%s.%N)
failed=$(sqlite3 "$Q" "SELECT COUNT(*) FROM recipients WHERE state = 2")
final_check=$(sqlite3 "$Q" "PRAGMA integrity_check" | tr '\n' ' ')

sort "$ACKED" | uniq >"$TMP/acked.sorted"
cut -d' ' -f1 "$SINK_OUT" | sort >"$TMP/received.sorted"
uniq "$TMP/received.sorted" >"$TMP/received.uniq"
acked=$(wc -l <"$TMP/acked.sorted")
acked_dups=$(( $(wc -l <"$ACKED") - acked ))
[[ $acked_dups -eq 0 ]] || die "the load generator acknowledged a number twice ($acked_dups)"
received=$(wc -l <"$TMP/received.sorted")
lost=$(comm -23 "$TMP/acked.sorted" "$TMP/received.uniq" | wc -l)
duplicated=$(uniq -d "$TMP/received.sorted" | wc -l)
extra_copies=$(( received - $(wc -l <"$TMP/received.uniq") ))
unacked_delivered=$(comm -13 "$TMP/acked.sorted" "$TMP/received.uniq" | wc -l)
comm -23 "$TMP/acked.sorted" "$TMP/received.uniq" | head -n 20 >"$TMP/lost.sample"
# Each extra copy is either a redelivery after a kill (a kill between the two copies: the
# sink had it, the queue had not yet recorded it; at-least-once) or a resend within one
# run of the daemon (what must not happen).
read -r across_kill within_run < <(awk 'NR == FNR { k0[++nk] = $1; k1[nk] = $2; next }
    { n = ++count[$1]; t[$1, n] = $2 }
    END {
        a = 0; w = 0
        for (id in count) for (i = 2; i <= count[id]; i++) {
            lo = t[id, i - 1]; hi = t[id, i]; if (lo > hi) { x = lo; lo = hi; hi = x }
            # A kill takes a moment: a copy taken while it was under way belongs to that run.
            hit = 0; for (k = 1; k <= nk; k++) if (lo <= k1[k] && hi >= k0[k]) hit = 1
            if (hit) a++; else w++
        }
        print a, w
    }' "$TMP/kills" "$SINK_OUT")
dup_pct=$(awk -v d="$extra_copies" -v a="$acked" 'BEGIN { printf "%.3f", a ? 100 * d / a : 0 }')
elapsed=$(awk -v a="$t_start" -v b="$t_load" 'BEGIN { printf "%.1f", b - a }')
drain=$(awk -v a="$t_load" -v b="$t_drain" 'BEGIN { printf "%.1f", b - a }')
stop_pid "$FG_PID"

# ------------------------------------------------------------ 2. disk full

FULL_DIR=$TMP/fulld
mkdir -p "$FULL_DIR" "$FULL_MNT"
mount -t tmpfs -o size=8m,mode=0755 tmpfs "$FULL_MNT"
free_port; FULL_SMTP=$PORT
free_port; FULL_HTTP=$PORT
write_config "$FULL_DIR" "$FULL_MNT/queue" "$FULL_SMTP" "$FULL_HTTP" false
mkdir -p "$FULL_MNT/queue"
start_fg "$FULL_DIR"
FULL_PID=$FG_PID
"${LOAD[@]}" probe --smtp "$FULL_SMTP" --http "$FULL_HTTP" --key "$API_KEY" --tag before >"$TMP/full-before" 2>&1
dd if=/dev/zero of="$FULL_MNT/filler" bs=64k 2>/dev/null || true   # until ENOSPC
full_smtp_replies=""
full_http_replies=""
for i in $(seq 40); do   # the WAL may hold a little room: probe until both refuse (bounded)
    line=$("${LOAD[@]}" probe --smtp "$FULL_SMTP" --http "$FULL_HTTP" --key "$API_KEY" --tag "full$i")
    d=$(sed -n 's/.*data=\([0-9]*\).*/\1/p' <<<"$line"); h=$(sed -n 's/.*http=\([0-9]*\).*/\1/p' <<<"$line")
    full_smtp_replies+="$d "; full_http_replies+="$h "
    [[ $d != 250 && $h != 202 ]] && break
done
smtp_full_text=$(python3 - "$FULL_SMTP" <<'PY'
import smtplib, sys
try:
    s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=5); s.ehlo("x"); s.mail("chaos@client.test")
    s.rcpt("user@chaos.test"); print(*s.data(b"Subject: chaos full-text\r\n\r\nx\r\n"))
except smtplib.SMTPDataError as e: print(e.smtp_code, e.smtp_error.decode())
except Exception as e: print("error", e)
PY
)
rm -f "$FULL_MNT/filler"
free_line=$("${LOAD[@]}" probe --smtp "$FULL_SMTP" --http "$FULL_HTTP" --key "$API_KEY" --until-ok 10 --tag freed | tail -n 1)
kill -0 "$FULL_PID" 2>/dev/null && full_alive=yes || full_alive=no
full_check=$(sqlite3 "$FULL_MNT/queue/queue.db" "PRAGMA integrity_check" | tr '\n' ' ')
stop_pid "$FULL_PID"
umount "$FULL_MNT"

# ------------------------------------------------------------ 3. DNS outage

DNS_DIR=$TMP/dnsd
mkdir -p "$DNS_DIR/queue"
free_port; DNS_SMTP=$PORT
free_port; DNS_HTTP=$PORT
write_config "$DNS_DIR" "$DNS_DIR/queue" "$DNS_SMTP" "$DNS_HTTP" false
start_fg "$DNS_DIR"
"${LOAD[@]}" probe --smtp "$DNS_SMTP" --http "$DNS_HTTP" --key "$API_KEY" --fresh 0 --tag up >"$TMP/dns-up" 2>&1
kill -STOP "$DNS_PID"
: >"$TMP/dns-down"
for i in $(seq 10); do
    "${LOAD[@]}" probe --smtp "$DNS_SMTP" --http "$DNS_HTTP" --key "$API_KEY" --fresh $((2 * i)) --tag "down$i" >>"$TMP/dns-down"
done
kill -CONT "$DNS_PID"
dns_recovery=$("${LOAD[@]}" probe --smtp "$DNS_SMTP" --http "$DNS_HTTP" --key "$API_KEY" --fresh 30 --until-ok 10 --tag back | tail -n 1)
down_rcpt=$(sed -n 's/.*rcpt=\([0-9]*\).*/\1/p' "$TMP/dns-down" | sort | uniq -c | awk '{ printf "%s x %s, ", $1, $2 }')
down_http=$(sed -n 's/.*http=\([0-9]*\).*/\1/p' "$TMP/dns-down" | sort | uniq -c | awk '{ printf "%s x %s, ", $1, $2 }')
down_5xx=$(sed -n 's/.*rcpt=\([0-9]*\).*/\1/p' "$TMP/dns-down" | grep -c '^5' || true)
stop_pid "$FG_PID"

# ------------------------------------------------------------ report

echo
echo "Chaos: $TRIALS kill -9 trials (run ${MIN_RUN}-${MAX_RUN} s each, random), $SESSIONS SMTP sessions +"
echo "1 HTTP client, relay to a loopback SMTP sink; $NPROC x $CPU_MODEL, $(date -u +%Y-%m-%d);"
echo "load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| trials | acknowledged | lost | duplicated (extra copies) | dup % of acked | delivered, never acked | failed | integrity_check |"
echo "|---:|---:|---:|---:|---:|---:|---:|---|"
printf "| %d | %d | %d | %d (%d) | %s %% | %d | %d | %d of %d after a kill not ok; final: %s|\n" \
    "$TRIALS" "$acked" "$lost" "$duplicated" "$extra_copies" "$dup_pct" "$unacked_delivered" "$failed" \
    "$bad_integrity" "$TRIALS" "$final_check"
echo
echo "extra copies: $across_kill redelivered after a kill (between the two copies), $within_run resent within one run"
echo "load ran ${elapsed} s across the kills; drain after the last restart ${drain} s; load: $(cat "$TMP/load.out")"
[[ $lost -eq 0 ]] || { echo "LOST (first 20):"; cat "$TMP/lost.sample"; }
echo
echo "Disk full (queue on an 8 MiB tmpfs, filled): DATA replies while full: $full_smtp_replies; HTTP: $full_http_replies"
echo "  SMTP reply text: $smtp_full_text"
echo "  after the filler was removed, without restart: $free_line (daemon alive: $full_alive; integrity_check: $full_check)"
echo
echo "DNS outage (dnsmasq SIGSTOPped, 10 probes with fresh domains): RCPT ${down_rcpt} HTTP ${down_http} 5xx at RCPT: $down_5xx"
echo "  after SIGCONT, first fresh domain accepted again: $dns_recovery s"
[[ $lost -eq 0 ]] || exit 1
