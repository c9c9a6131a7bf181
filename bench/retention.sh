#!/usr/bin/env bash
# bench/retention.sh: does queue.db stay small when the queue forgets what is finished?
#
#   examples/loadgen (valid mail only, its own receiving SMTP server) -> Floodgate
#   ([queue] retention = 1 minute, delivery on, MX from a loopback dnsmasq -> the loadgen)
#
# Sends MESSAGES messages (one recipient each) at RATE per second, sampling the size of
# queue.db (+ its WAL) every 5 s; after the last delivery, waits for one retention tick and
# times SCRAPES scrapes of /metrics (curl's time_total). Reports the largest file size
# seen, the final one, rows left in queue.db, the lifetime totals from /metrics, and the
# scrape times (median and max). The issue's target: after 2,000,000 messages, queue.db
# under 50 MB and a scrape under 10 ms.
#
# A benchmark, not a test: it fails only when something does not work (a daemon does not
# start, a message is lost). Root only (dnsmasq). Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/retention.sh [options]

  -m, --messages N   messages to deliver                   (env MESSAGES, default 2000000)
      --rate R       messages per second offered           (env RATE, default 2000)
      --sessions N   SMTP sessions of the loadgen          (env SESSIONS, default 16)
      --retention D  Floodgate [queue] retention           (env RETENTION, default 1m)
      --scrapes N    /metrics scrapes timed at the end      (env SCRAPES, default 50)
      --debug        use the debug build (target/debug): figures are then upper bounds
      --no-build     do not build first
      --keep         keep the temporary directory
  -h, --help         this text
EOF
}

MESSAGES=${MESSAGES:-2000000}
RATE=${RATE:-2000}
SESSIONS=${SESSIONS:-16}
RETENTION=${RETENTION:-1m}
SCRAPES=${SCRAPES:-50}
BUILD=1
KEEP=0
PROFILE=release
while [[ $# -gt 0 ]]; do
    case $1 in
        -m|--messages) MESSAGES=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        --retention) RETENTION=$2; shift 2 ;;
        --scrapes) SCRAPES=$2; shift 2 ;;
        --debug) PROFILE=debug; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "retention.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in MESSAGES RATE SESSIONS SCRAPES; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "retention.sh: $v must be a whole number above 0" >&2; exit 2; }
done

NAME=retention
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
for c in dnsmasq sqlite3 curl python3; do command -v "$c" >/dev/null || die "$c not found"; done
if [[ $BUILD -eq 1 ]]; then
    flag=--release; [[ $PROFILE == debug ]] && flag=
    log "cargo build $flag --bin floodgate --example loadgen"
    # shellcheck disable=SC2086
    (cd "$REPO" && cargo build $flag --quiet --bin floodgate --example loadgen)
fi
FLOODGATE=$REPO/target/$PROFILE/floodgate
LOADGEN=$REPO/target/$PROFILE/examples/loadgen
[[ -x $FLOODGATE && -x $LOADGEN ]] || die "build first (floodgate and examples/loadgen)"
log "machine: $NPROC x $CPU_MODEL; 4 KiB O_DSYNC write: $(dsync_ms) ms"

start_dnsmasq --mx-host=ok.test,mx.ok.test,10 --address=/mx.ok.test/127.0.0.1

dir=$TMP/run
mkdir -p "$dir/queue"
free_port; smtp=$PORT
free_port; http=$PORT
free_port; admin=$PORT
free_port; sink=$PORT
TOKEN=bench-admin-token-0123456789abcdef
cat >"$dir/floodgate.toml" <<EOF
[smtp]
listen = ["127.0.0.1:$smtp"]
max_connections_per_ip = 1000

[http]
listen = "127.0.0.1:$http"

[admin]
listen = "127.0.0.1:$admin"
token = "$TOKEN"

[queue]
dir = "$dir/queue"
retention = "$RETENTION"

[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]

[delivery]
rate = "1000000/s"
concurrency = 32

[guard]
enabled = false

$(sink_route "$sink")
EOF
serve_floodgate "$dir" "$smtp"

db=$dir/queue/queue.db
size_now() { stat -c %s "$db" "$db-wal" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }
duration=$(( (MESSAGES + RATE - 1) / RATE ))
log "loadgen: $MESSAGES messages at $RATE/s over $SESSIONS sessions (~${duration} s), retention $RETENTION"
"$LOADGEN" --smtp "127.0.0.1:$smtp" --admin "127.0.0.1:$admin" --admin-token "$TOKEN" \
    --sink "127.0.0.1:$sink" --flood false --valid-rate "$RATE" --valid-sessions "$SESSIONS" \
    --duration "$duration" --tail 0 --drain 120 --pid "$FG_PID" --max-seconds $((duration * 3 + 600)) \
    >"$dir/loadgen.json" 2>"$dir/loadgen.err" &
lg=$!
PIDS+=("$lg")
max=0
: >"$dir/sizes"
while kill -0 "$lg" 2>/dev/null; do
    s=$(size_now)
    (( s > max )) && max=$s
    printf '%s %s\n' "$(date +%s)" "$s" >>"$dir/sizes"
    sleep 5
done
rc=0; wait "$lg" || rc=$?
forget_pid "$lg"
[[ $rc -eq 0 ]] || { tail -n 20 "$dir/loadgen.err" >&2; die "loadgen failed (exit $rc)"; }

# One more retention tick (30 s) after the last delivery, so the steady state is measured.
sleep 35
s=$(size_now); (( s > max )) && max=$s
: >"$dir/scrapes"
for _ in $(seq "$SCRAPES"); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$admin/metrics" >>"$dir/scrapes"
done
curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$admin/metrics" >"$dir/metrics"
rows=$(sqlite3 -readonly "$db" "SELECT (SELECT COUNT(*) FROM messages) || ' messages, ' || (SELECT COUNT(*) FROM recipients) || ' recipients'")
stop_pid "$FG_PID"
python3 - "$dir/loadgen.json" "$dir/scrapes" "$dir/metrics" "$max" "$s" "$rows" "$MESSAGES" "$RATE" "$RETENTION" "$PROFILE" <<'EOF'
import json, statistics, sys
lg = json.load(open(sys.argv[1]))
times = sorted(float(t) * 1000 for t in open(sys.argv[2]) if t.strip())
metrics = dict(l.split() for l in open(sys.argv[3]) if l.startswith("floodgate_queue_"))
mb = lambda b: int(b) / 1024 / 1024
v = lg["valid"]
print(f"messages offered {sys.argv[7]} at {sys.argv[8]}/s, retention {sys.argv[9]}, build {sys.argv[10]}")
print(f"acknowledged {v['sent_acked']}, received by the sink {v['received']} "
      f"(lost {v['sent_acked'] - v['received_of_acked']}, duplicates {v['duplicates']}), "
      f"achieved {v['rate_achieved']:.0f} msg/s")
print(f"queue.db + WAL: largest {mb(sys.argv[4]):.1f} MiB, at the end {mb(sys.argv[5]):.1f} MiB; left: {sys.argv[6]}")
for k in ('floodgate_queue_finished_total{state="delivered"}', 'floodgate_queue_pruned_total{table="messages"}'):
    print(f"{k} {metrics.get(k, '?')}")
print(f"/metrics scrape: median {statistics.median(times):.2f} ms, max {times[-1]:.2f} ms over {len(times)}")
EOF
