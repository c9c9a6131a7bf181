#!/usr/bin/env bash
# bench/whereabouts.sh: "where is my mail?" at scale, in one run.
#
#   1. A queue.db of MESSAGES waiting messages x RCPTS recipients (1,000,000 by default)
#      with BODY-byte bodies (~1 GB), written with sqlite3 into the daemon's own schema.
#   2. Find by recipient: FINDS lookups of random recipients through the admin API
#      (`GET /admin/v1/messages?rcpt=`), timed by curl (time_total): median, p99, max.
#   3. Intake p99 without and during an online backup of that queue: whereload.py sends
#      one-recipient messages at RATE per second for SECONDS, then again while
#      `POST /admin/v1/backup` copies the queue; the ratio of the two p99s (target 1.5x).
#
# Delivery is off (the queue only grows). A benchmark, not a test: it fails only when
# something does not work. Root only (dnsmasq). Talks to 127.0.0.1 only.

set -euo pipefail

MESSAGES=${MESSAGES:-100000}
RCPTS=${RCPTS:-10}
BODY=${BODY:-10000}
FINDS=${FINDS:-200}
RATE=${RATE:-200}
SECONDS_RUN=${SECONDS_RUN:-20}
PROFILE=${PROFILE:-release}
KEEP=${KEEP:-0}
IDLE_WAIT=${IDLE_WAIT:-30}
NAME=whereabouts
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
need_root
for pc in dnsmasq-base:dnsmasq sqlite3:sqlite3 curl:curl; do
    command -v "${pc#*:}" >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pc%%:*}" >/dev/null; }
done
FLOODGATE=$REPO/target/$PROFILE/floodgate
[[ -x $FLOODGATE ]] || die "$FLOODGATE missing: cargo build --$PROFILE first"
TOKEN=bench-admin-token-0123456789abcdef

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1 \
    --mx-host=client.bench.test,mx.bench.test,10
free_port; SMTP_PORT=$PORT
free_port; ADMIN_PORT=$PORT
D=$TMP/fg
mkdir -p "$D"
intake_toml "$D" "$SMTP_PORT" normal >"$D/floodgate.toml"
sed -i "/^\[admin\]/,/^\[/ s/^listen = .*/listen = \"127.0.0.1:$ADMIN_PORT\"/" "$D/floodgate.toml"
printf '\n[delivery]\nenabled = false\n\n' >>"$D/floodgate.toml"
sink_route 9 >>"$D/floodgate.toml"   # a route, so the door accepts; delivery stays off

# 1. The schema from the daemon itself, then the rows.
serve_floodgate "$D" "$SMTP_PORT"
stop_pid "$FG_PID"
log "filling queue.db: $MESSAGES messages x $RCPTS recipients, $BODY-byte bodies"
t0=$(date +%s)
sqlite3 "$D/queue/queue.db" >/dev/null <<SQL
PRAGMA journal_mode = WAL;
PRAGMA synchronous = OFF;
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $MESSAGES)
INSERT INTO messages (id, queue_id, sender, campaign, source, client, received_at, size, identity)
SELECT i, printf('BENCH%012d', i), printf('app%d@client.bench.test', i % 50), printf('c%d', i % 20),
       'smtp', '127.0.0.1', CAST(strftime('%s','now') AS INTEGER) * 1000 - ($MESSAGES - i), $BODY, NULL FROM n;
INSERT INTO bodies (message_id, body) SELECT id, randomblob($BODY) FROM messages;
WITH RECURSIVE r(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM r WHERE j < $RCPTS - 1)
INSERT INTO recipients (message_id, address, domain, campaign, state, next_attempt, updated_at)
SELECT m.id, printf('u%d-%d@bench.test', m.id, r.j), 'bench.test', m.campaign, 0, m.received_at, m.received_at
FROM messages m, r;
COMMIT;
SQL
QUEUE_BYTES=$(stat -c %s "$D/queue/queue.db")
log "filled in $(( $(date +%s) - t0 )) s: queue.db $((QUEUE_BYTES / 1048576)) MiB"
serve_floodgate "$D" "$SMTP_PORT"
ADMIN=http://127.0.0.1:$ADMIN_PORT

# 2. Find by recipient.
wait_idle "find"
: >"$TMP/find.txt"
for _ in $(seq "$FINDS"); do
    m=$(( (RANDOM * 32768 + RANDOM) % MESSAGES + 1 )); j=$(( RANDOM % RCPTS ))
    out=$(curl -s -o "$TMP/find.json" -w '%{http_code} %{time_total}' -H "Authorization: Bearer $TOKEN" \
        "$ADMIN/admin/v1/messages?rcpt=u$m-$j%40bench.test")
    [[ ${out%% *} == 200 ]] || die "find answered ${out%% *}: $(cat "$TMP/find.json")"
    grep -q "\"address\":\"u$m-$j@bench.test\"" "$TMP/find.json" || die "u$m-$j not found"
    echo "${out#* }" >>"$TMP/find.txt"
done
read -r FIND_MED FIND_P99 FIND_MAX < <(sort -n "$TMP/find.txt" | awk '{a[NR]=$1} END {
    p = int(NR * 0.99) + 1; if (p > NR) p = NR
    printf "%.2f %.2f %.2f\n", a[int(NR * 0.5) + 1] * 1000, a[p] * 1000, a[NR] * 1000 }')

# 3. Intake without, then during, a backup.
wait_idle "intake without a backup"
python3 "$REPO/bench/whereload.py" 127.0.0.1 "$SMTP_PORT" "$SECONDS_RUN" "$RATE" "$TMP/base.json"
wait_idle "intake during a backup"
python3 "$REPO/bench/whereload.py" 127.0.0.1 "$SMTP_PORT" 0 "$RATE" "$TMP/during.json" \
    --window "$TMP/backup.started" "$TMP/backup.done" &
LOAD=$!
sleep 2
touch "$TMP/backup.started"
curl -s -o "$TMP/backup.json" -w '%{http_code}\n' -H "Authorization: Bearer $TOKEN" \
    -d '{"name": "bench"}' "$ADMIN/admin/v1/backup" >"$TMP/backup.code"
touch "$TMP/backup.done"
wait "$LOAD"
[[ $(cat "$TMP/backup.code") == 200 ]] || die "backup answered $(cat "$TMP/backup.code"): $(cat "$TMP/backup.json")"
stop_pid "$FG_PID"

python3 - "$TMP" "$QUEUE_BYTES" "$MESSAGES" "$RCPTS" "$FIND_MED" "$FIND_P99" "$FIND_MAX" "$FINDS" "$RATE" <<'PY'
import json, sys
tmp, qbytes, msgs, rcpts, med, p99, mx, finds, rate = sys.argv[1:]
b = json.load(open(f"{tmp}/base.json")); d = json.load(open(f"{tmp}/during.json"))
k = json.load(open(f"{tmp}/backup.json"))
print(f"queue: {int(msgs) * int(rcpts):,} waiting recipients in {int(msgs):,} messages, queue.db {int(qbytes) / 2**20:,.0f} MiB")
print(f"find by recipient ({finds} lookups, curl time_total): median {med} ms, p99 {p99} ms, max {mx} ms (target < 100 ms)")
print(f"backup: {k['took_ms'] / 1000:.1f} s, copy {k['queue']['bytes'] / 2**20:,.0f} MiB, integrity {k['queue']['integrity']}, {k['messages']:,} messages")
print("| intake at %s msg/s | messages | errors | p50 ms | p99 ms | max ms |" % rate)
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, r in (("without a backup", b), ("during the backup", d)):
    print(f"| {name} | {r['count']} | {r['errors']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} |")
if b["errors"] or d["errors"] or not b["count"] or not d["count"]:
    sys.exit(f"intake failed: {b} {d}")
ratio = d["p99"] / max(b["p99"], 1e-9)
print(f"intake p99 during / without: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'})")
PY
