#!/usr/bin/env bash
# bench/http.sh: HTTP intake (POST /v1/messages) next to SMTP intake, in one run.
#
#   smtp  smtp-source -d -s 20 -m 20000 -l 1024 into Floodgate (as bench/intake.sh does)
#   http  wrk, 64 connections, POSTing a 1 KiB JSON message with a Bearer API key
#
# Both against a fresh Floodgate each: delivery off, synchronous = "full", the recipient's
# domain checked over DNS (loopback dnsmasq). 202/250 means the message is on disk.
# Skips the HTTP row (and says so) when POST /v1/messages does not answer 202.
#
# A benchmark, not a test. Root only (it installs packages). Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/http.sh [options]

  -c, --connections N  wrk connections                 (env CONNECTIONS, default 64)
  -t, --threads N      wrk threads                     (env THREADS, default 2)
  -d, --duration S     wrk duration in seconds         (env DURATION, default 20)
  -m, --messages N     smtp-source messages            (env MESSAGES, default 20000)
  -s, --sessions N     smtp-source sessions            (env SESSIONS, default 20)
  -l, --size N         payload bytes (text / smtp-source -l) (env SIZE, default 1024)
      --no-build       do not run `cargo build --release` first
      --keep           keep the temporary directory
      --idle-wait S    wait up to S s for an idle machine before each row (default 120)
  -h, --help           this text
EOF
}

CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
DURATION=${DURATION:-20}
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
IDLE_WAIT=${IDLE_WAIT:-120}
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -c|--connections) CONNECTIONS=$2; shift 2 ;;
        -t|--threads) THREADS=$2; shift 2 ;;
        -d|--duration) DURATION=$2; shift 2 ;;
        -m|--messages) MESSAGES=$2; shift 2 ;;
        -s|--sessions) SESSIONS=$2; shift 2 ;;
        -l|--size) SIZE=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "http.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in CONNECTIONS THREADS DURATION MESSAGES SESSIONS SIZE IDLE_WAIT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "http.sh: $v must be a positive integer" >&2; exit 2; }
done

NAME=http
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
install_prereqs wrk:wrk
if [[ $BUILD -eq 1 ]]; then build_release; else FLOODGATE=$REPO/target/release/floodgate; fi
[[ -x $FLOODGATE ]] || die "$FLOODGATE missing (run without --no-build)"
log "machine: $NPROC x $CPU_MODEL; 4 KiB O_DSYNC write: $(dsync_ms) ms"

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1
read -r API_KEY API_HASH < <("$FLOODGATE" gen-key 2>/dev/null | awk '/^key:/ { k = $2 } /^key_sha256/ { gsub(/"/, "", $3); h = $3 } END { print k, h }')

new_floodgate() {   # new_floodgate NAME: fresh Floodgate, delivery off; sets FG_DIR FG_SMTP FG_HTTP FG_PID
    FG_DIR=$TMP/$1
    mkdir -p "$FG_DIR/queue"
    free_port; FG_SMTP=$PORT
    free_port; FG_HTTP=$PORT
    cat >"$FG_DIR/floodgate.toml" <<EOF
[server]
hostname = "bench.floodgate"

[smtp]
listen = ["127.0.0.1:$FG_SMTP"]
max_connections = 1000
max_connections_per_ip = 1000

[http]
listen = "127.0.0.1:$FG_HTTP"

[[http.api_keys]]
name = "bench"
key_sha256 = "$API_HASH"

[admin]
listen = "127.0.0.1:0"
token = "bench-admin-token-0123456789abcdef"

[queue]
dir = "$FG_DIR/queue"
synchronous = "full"

[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]

[delivery]
enabled = false
EOF
    start_floodgate "$FG_DIR"
    wait_port "$FG_SMTP" "$FG_PID" floodgate "$FG_DIR/floodgate.log"
    wait_port "$FG_HTTP" "$FG_PID" floodgate "$FG_DIR/floodgate.log"
}

# The request body: a 1 KiB text part (SIZE bytes), one recipient at the DNS-checked domain.
TEXT=$(python3 -c "import sys; n = int(sys.argv[1]); s = ('The quick brown fox jumps over the lazy dog. ' * (n // 44 + 1))[:n]; print(s)" "$SIZE")
BODY=$(python3 -c 'import json, sys; print(json.dumps({"from": "bench@client.test", "to": ["user@bench.test"], "subject": "bench", "text": sys.argv[1]}))' "$TEXT")
printf '%s' "$BODY" >"$TMP/body.json"

RESULTS=$TMP/results
: >"$RESULTS"

# ---------------------------------------------------------------- a. SMTP intake

new_floodgate smtp
sync; wait_idle smtp
c0=$(cpu_sample); f0=$(proc_cpu "$FG_PID")
log "smtp: smtp-source -d -s $SESSIONS -m $MESSAGES -l $SIZE -> 127.0.0.1:$FG_SMTP"
t0=$(date +%s.%N)
smtp-source -d -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f bench@client.test -t user@bench.test \
    -M client.test "127.0.0.1:$FG_SMTP" >"$TMP/source.log" 2>&1 &
pid=$!; PIDS+=("$pid"); rc=0; wait "$pid" || rc=$?; forget_pid "$pid"
t1=$(date +%s.%N)
c1=$(cpu_sample); f1=$(proc_cpu "$FG_PID")
[[ $rc -eq 0 ]] || { tail "$TMP/source.log" >&2; die "smtp-source failed"; }
count=$(sqlite3 "$FG_DIR/queue/queue.db" 'SELECT COUNT(*) FROM messages')
[[ $count -eq $MESSAGES ]] || die "smtp: queue.db holds $count messages, expected $MESSAGES"
awk -v t0="$t0" -v t1="$t1" -v m="$MESSAGES" -v c0="$c0" -v c1="$c1" -v f0="$f0" -v f1="$f1" -v hz="$HZ" 'BEGIN {
    split(c0, a, " "); split(c1, b, " "); tot = b[3] - a[3]; if (tot <= 0) tot = 1; s = t1 - t0
    printf "smtp %d %.2f %.0f - - %.0f %.0f %d\n", m, s, m / s, 100 * (b[1] - a[1]) / tot, 100 * (f1 - f0) / hz / s, m }' >>"$RESULTS"
log "smtp: $(tail -n 1 "$RESULTS" | awk '{ print $4 " msg/s" }')"
stop_pid "$FG_PID"

# ---------------------------------------------------------------- b. HTTP intake

new_floodgate http
status=$(curl -s -o "$TMP/curl.out" -w '%{http_code}' --max-time 10 -X POST \
    -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' \
    --data-binary @"$TMP/body.json" "http://127.0.0.1:$FG_HTTP/v1/messages" || true)
log "http: probe POST /v1/messages -> $status $(head -c 200 "$TMP/curl.out")"
HTTP_OK=1
if [[ $status != 202 ]]; then
    HTTP_OK=0
    log "http: POST /v1/messages does not answer 202 on this tree: HTTP row skipped"
else
    cat >"$TMP/post.lua" <<EOF
-- POST /v1/messages with a Bearer key; counts statuses per thread.
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $API_KEY"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$TMP/body.json", "rb")
wrk.body = f:read("*a")
f:close()

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
    local counts = {}
    for _, t in ipairs(threads) do
        for s, n in pairs(t:get("statuses")) do counts[s] = (counts[s] or 0) + n end
    end
    for s, n in pairs(counts) do io.write(string.format("STATUS %d %d\n", s, n)) end
    io.write(string.format("RESULT %d %.3f %.3f %.3f %.3f %d\n", summary.requests, summary.duration / 1e6,
        latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
        summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
EOF
    before=$(sqlite3 "$FG_DIR/queue/queue.db" 'SELECT COUNT(*) FROM messages')
    sync; wait_idle http
    c0=$(cpu_sample); f0=$(proc_cpu "$FG_PID")
    log "http: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency -s post.lua http://127.0.0.1:$FG_HTTP/v1/messages"
    t0=$(date +%s.%N)
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency -s "$TMP/post.lua" \
        "http://127.0.0.1:$FG_HTTP/v1/messages" >"$TMP/wrk.out" 2>&1 &
    pid=$!; PIDS+=("$pid"); rc=0; wait "$pid" || rc=$?; forget_pid "$pid"
    t1=$(date +%s.%N)
    c1=$(cpu_sample); f1=$(proc_cpu "$FG_PID")
    [[ $rc -eq 0 ]] || { cat "$TMP/wrk.out" >&2; die "wrk failed"; }
    sleep 1
    after=$(sqlite3 "$FG_DIR/queue/queue.db" 'SELECT COUNT(*) FROM messages')
    cat "$TMP/wrk.out" >&2
    read -r _ reqs secs p50 p99 _ errs < <(grep '^RESULT' "$TMP/wrk.out")
    accepted=$(awk '$1 == "STATUS" && $2 == 202 { print $3 }' "$TMP/wrk.out")
    log "http: $reqs responses in $secs s ($(grep '^STATUS' "$TMP/wrk.out" | paste -sd' ')), socket errors $errs;" \
        "queue.db gained $((after - before)) messages"
    awk -v r="$reqs" -v s="$secs" -v p50="$p50" -v p99="$p99" -v c0="$c0" -v c1="$c1" -v f0="$f0" -v f1="$f1" \
        -v hz="$HZ" -v q="$((after - before))" -v t0="$t0" -v t1="$t1" 'BEGIN {
        split(c0, a, " "); split(c1, b, " "); tot = b[3] - a[3]; if (tot <= 0) tot = 1
        printf "http %d %.2f %.0f %.2f %.2f %.0f %.0f %d\n", r, s, r / s, p50, p99, 100 * (b[1] - a[1]) / tot, 100 * (f1 - f0) / hz / (t1 - t0), q }' >>"$RESULTS"
    [[ ${accepted:-0} -eq $reqs ]] || log "warning: not every response was 202"
fi
stop_pid "$FG_PID"

# ---------------------------------------------------------------- report

echo
echo "Intake, SMTP vs HTTP: Floodgate delivery off, synchronous = \"full\"; SMTP: smtp-source -d -s $SESSIONS" \
    "-m $MESSAGES -l $SIZE; HTTP: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $SIZE-byte text;" \
    "$NPROC x $CPU_MODEL, $(date -u +%Y-%m-%d)"
echo
awk '
    BEGIN {
        printf "| %-4s | %9s | %7s | %8s | %7s | %7s | %8s | %13s | %13s |\n", "path", "messages", "seconds", "msg/s", "p50 ms", "p99 ms", "CPU busy", "floodgate CPU", "queued"
        printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "------", "----------:", "--------:", "---------:", "--------:", "--------:", "---------:", "--------------:", "--------------:"
    }
    { printf "| %-4s | %9d | %7.2f | %8d | %7s | %7s | %7d%% | %12d%% | %13d |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9; rate[$1] = $4 }
    END { if (rate["http"] > 0) printf "\nhttp / smtp (msg/s): %.2f   (target >= 1)\n", rate["http"] / rate["smtp"] }' "$RESULTS"
[[ $HTTP_OK -eq 1 ]] || echo "HTTP row skipped: POST /v1/messages did not answer 202 on this tree."
echo
echo "CPU busy: share of all $NPROC CPUs (client and Floodgate share them); floodgate CPU: of one CPU."
