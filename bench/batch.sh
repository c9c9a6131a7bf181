#!/usr/bin/env bash
# bench/batch.sh: one batch send of N recipients (half invalid) in one streamed request,
# next to the same kind of recipients sent as individual POST /v1/messages, in one run.
#
#   batch       POST /v1/batches (a 20 KB template), then one POST .../recipients with
#               N NDJSON rows: half valid (distinct vars), a quarter empty or malformed,
#               a quarter at an NXDOMAIN domain. Measured: rows/s of the upload, the
#               daemon's peak RSS (VmHWM), queue.db bytes per accepted recipient once the
#               upload is answered; then delivery: the time from the answer until
#               smtp-sink has every valid message, and messages/s. Delivery runs at
#               [delivery] rate = RATE per destination (every valid row is at one
#               destination, bench.test; the shipped default of 100/s would be the
#               whole figure) and concurrency = CONCURRENCY.
#   individual  COMPARE recipients (same mix) as single-recipient POST /v1/messages with
#               the same 20 KB body, 8 keep-alive connections: recipients/s. Ratio.
#
# Delivery to a loopback smtp-sink, DNS from loopback dnsmasq, synchronous = "full",
# the guard off (half of the rows are bad on purpose). A benchmark, not a test. Root only
# (it installs packages). Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/batch.sh [options]

  -n, --rows N         rows in the batch                (env ROWS, default 1000000)
      --compare N      recipients sent one per request  (env COMPARE, default 20000)
      --no-build       do not run `cargo build --release` first
      --keep           keep the temporary directory
      --idle-wait S    wait up to S s for an idle machine before each row (default 120)
      --rate R         [delivery] rate per destination    (env RATE, default 100000/s;
                       "default" leaves the shipped 100/s)
      --concurrency C  [delivery] concurrency per destination (env CONCURRENCY, default 10)
  -h, --help           this text
EOF
}

ROWS=${ROWS:-1000000}
COMPARE=${COMPARE:-20000}
IDLE_WAIT=${IDLE_WAIT:-120}
RATE=${RATE:-100000/s}
CONCURRENCY=${CONCURRENCY:-10}
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -n|--rows) ROWS=$2; shift 2 ;;
        --compare) COMPARE=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "batch.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $RATE == default || $RATE =~ ^[0-9]+/(s|m|h)$ ]] || { echo "batch.sh: --rate takes N/s, N/m, N/h or default" >&2; exit 2; }
for v in ROWS COMPARE IDLE_WAIT CONCURRENCY; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "batch.sh: $v must be a positive integer" >&2; exit 2; }
done

NAME=batch
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
install_prereqs
if [[ $BUILD -eq 1 ]]; then build_release; else FLOODGATE=$REPO/target/release/floodgate; fi
[[ -x $FLOODGATE ]] || die "$FLOODGATE missing (run without --no-build)"
log "machine: $NPROC x $CPU_MODEL; 4 KiB O_DSYNC write: $(dsync_ms) ms"

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1
read -r API_KEY API_HASH < <("$FLOODGATE" gen-key 2>/dev/null | awk '/^key:/ { k = $2 } /^key_sha256/ { gsub(/"/, "", $3); h = $3 } END { print k, h }')

free_port; SINK_PORT=$PORT
smtp-sink -c -u nobody "127.0.0.1:$SINK_PORT" 1024 >"$TMP/sink.out" 2>"$TMP/sink.err" &
SINK_PID=$!
PIDS+=("$SINK_PID")
wait_port "$SINK_PORT" "$SINK_PID" smtp-sink "$TMP/sink.err"

new_floodgate() {   # new_floodgate NAME: fresh Floodgate; sets FG_DIR FG_HTTP FG_PID
    FG_DIR=$TMP/$1
    mkdir -p "$FG_DIR/queue"
    free_port; local smtp=$PORT
    free_port; FG_HTTP=$PORT
    {
        # The first port-0 listener of intake_toml is [http]'s: give it a known port.
        intake_toml "$FG_DIR" "$smtp" full | sed "0,/\"127\.0\.0\.1:0\"/s//\"127.0.0.1:$FG_HTTP\"/"
        cat <<EOF

[[http.api_keys]]
name = "bench"
key_sha256 = "$API_HASH"

[delivery]
enabled = true
concurrency = $CONCURRENCY
$([[ $RATE == default ]] || echo "rate = \"$RATE\"")

[guard]
enabled = false

EOF
        sink_route "$SINK_PORT"
    } >"$FG_DIR/floodgate.toml"
    serve_floodgate "$FG_DIR" "$smtp"
    wait_port "$FG_HTTP" "$FG_PID" floodgate "$FG_DIR/floodgate.log"
}

python3 "$REPO/bench/batchgen.py" rows "$ROWS" >"$TMP/rows.ndjson"
python3 "$REPO/bench/batchgen.py" template >"$TMP/template.json"
VALID=$(( (ROWS + 1) / 2 ))

# ---------------------------------------------------------------- batch
wait_idle batch
new_floodgate batch
auth=(-H "Authorization: Bearer $API_KEY")
id=$(curl -sf "${auth[@]}" --data-binary @"$TMP/template.json" "http://127.0.0.1:$FG_HTTP/v1/batches" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
t0=$(date +%s.%N)
curl -sf "${auth[@]}" -H "Content-Type: application/x-ndjson" -T "$TMP/rows.ndjson" -X POST \
    "http://127.0.0.1:$FG_HTTP/v1/batches/$id/recipients" >"$TMP/answer.json"
t1=$(date +%s.%N)
cpu1=$(proc_cpu "$FG_PID")
db_bytes=$(( $(stat -c %s "$FG_DIR/queue/queue.db") + $(stat -c %s "$FG_DIR/queue/queue.db-wal" 2>/dev/null || echo 0) ))
read -r received accepted rejected < <(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); print(a["received"], a["accepted"], sum(a["rejected"].values()))' "$TMP/answer.json")
[[ $received -eq $ROWS && $accepted -eq $VALID ]] || die "counts: received $received accepted $accepted (want $ROWS, $VALID)"
python3 "$REPO/bench/sinkwait.py" "$TMP/sink.out" "$VALID" 3600 >/dev/null
t2=$(date +%s.%N)
cpu2=$(proc_cpu "$FG_PID")
hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$FG_PID/status")
stop_pid "$FG_PID"
batch_rate=$(awk -v n="$ROWS" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
per_rcpt=$(awk -v b="$db_bytes" -v n="$accepted" 'BEGIN { printf "%.0f", b / n }')
deliver_s=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
tick=$(getconf CLK_TCK)
cpu_per_msg=$(awk -v c=$(( cpu2 - cpu1 )) -v t="$tick" -v n="$VALID" 'BEGIN { printf "%.0f", c / t * 1e6 / n }')
deliver_rate=$(awk -v n="$VALID" -v a="$t1" -v b="$t2" 'BEGIN { printf "%.0f", n / (b - a) }')
upload_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')

# ---------------------------------------------------------------- individual requests
: >"$TMP/sink.out"
wait_idle individual
new_floodgate individual
ind=$(python3 "$REPO/bench/batchgen.py" individual "$COMPARE" "$FG_HTTP" "$API_KEY")
stop_pid "$FG_PID"

ratio=$(awk -v a="$batch_rate" -v b="$ind" 'BEGIN { printf "%.1f", a / b }')
printf '\n| measure | value |\n| --- | ---: |\n'
printf '| rows in one request (half invalid) | %s (accepted %s, rejected %s; counts exact) |\n' "$ROWS" "$accepted" "$rejected"
printf '| upload | %s s, %s rows/s |\n' "$upload_s" "$batch_rate"
printf '| peak RSS of the daemon (VmHWM, upload and delivery) | %s MiB |\n' "$(( hwm / 1024 ))"
printf '| queue.db + WAL per accepted recipient (20 KB template) | %s B |\n' "$per_rcpt"
printf '| time from the answer until every valid message is at the sink ([delivery] rate %s, concurrency %s) | %s s, %s msg/s |\n' "$RATE" "$CONCURRENCY" "$deliver_s" "$deliver_rate"
printf '| daemon CPU per delivered message (utime + stime over the delivery) | %s µs |\n' "$cpu_per_msg"
printf '| same mix as single-recipient POST /v1/messages (%s, 8 connections) | %s recipients/s |\n' "$COMPARE" "$ind"
printf '| ratio (batch rows/s over individual recipients/s) | %s× |\n' "$ratio"
