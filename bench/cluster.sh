#!/usr/bin/env bash
# bench/cluster.sh: one node with cluster mode off vs on, side by side in one run.
#
#   smtp-source -> Floodgate -> smtp-sink        (delivery on, MX from a loopback dnsmasq)
#   smtp-source -> Floodgate + [cluster] -> smtp-sink, sharing a private redis-server
#
# Prints intake throughput (until smtp-source ends: every message acknowledged) and end to
# end relay throughput (until the sink has the last message) for both, their ratios, and
# the Redis round trips per message of the cluster run: Floodgate's own
# floodgate_cluster_round_trips_total (every command, pipeline and script it sent, the
# heartbeat included) and Redis's total_commands_processed (INFO stats, commands inside
# pipelines counted one by one), both over the run.
#
# A benchmark, not a test: it fails only when something does not work. Root only (it
# installs postfix for smtp-source/smtp-sink, dnsmasq and redis-server). Talks to
# 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/cluster.sh [options]

  -m, --messages N   messages per run                  (env MESSAGES, default 20000)
  -s, --sessions N   parallel smtp-source sessions     (env SESSIONS, default 20)
  -l, --size N       message payload in bytes          (env SIZE, default 1024)
      --rate R       [delivery] rate (shared in the cluster run) (env RATE, default 100000/s)
      --quick        smoke run: 2000 messages
      --no-build     do not run `cargo build --release` first
      --keep         keep the temporary directory (logs, queues)
      --idle-wait S  wait up to S s for an idle machine before each run (default 120)
      --timeout S    give up on a run after S s (default 600)
  -h, --help         this text
EOF
}

MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
RATE=${RATE:-100000/s}
IDLE_WAIT=${IDLE_WAIT:-120}
TIMEOUT=${TIMEOUT:-600}
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -m|--messages) MESSAGES=$2; shift 2 ;;
        -s|--sessions) SESSIONS=$2; shift 2 ;;
        -l|--size) SIZE=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --quick) MESSAGES=2000; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "cluster.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in MESSAGES SESSIONS SIZE IDLE_WAIT TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "cluster.sh: $v must be a positive integer" >&2; exit 2; }
done

NAME=cluster
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SENDER=bench@client.test
RECIPIENT=user@bench.test
TOKEN=bench-admin-token-0123456789abcdef

need_root
install_prereqs redis-server:redis-server redis-tools:redis-cli
if [[ $BUILD -eq 1 ]]; then build_release; else FLOODGATE=$REPO/target/release/floodgate; fi
[[ -x $FLOODGATE ]] || die "$FLOODGATE missing (run without --no-build)"
log "machine: $NPROC x $CPU_MODEL; $(redis-server --version | cut -d' ' -f1-3)"

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1

free_port; REDIS_PORT=$PORT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    >"$TMP/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" "$REDIS_PID" redis-server "$TMP/redis.log"
redis_commands() { redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | awk -F: '$1 == "total_commands_processed" { print $2 }'; }

metric() {   # metric DIR NAME: one series from the daemon's /metrics
    local admin
    admin=$(grep -o 'admin listening addr=[0-9.:]*' "$1/floodgate.log" | head -n 1 | cut -d= -f2)
    curl -s -H "Authorization: Bearer $TOKEN" "http://$admin/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

RESULTS=$TMP/results
: >"$RESULTS"

# run NAME CLUSTER_TOML: one Floodgate, smtp-source into it, wait for the sink.
#   appends: name intake_s total_s rtt cmds
run() {
    local name=$1 cluster=$2 dir=$TMP/$1 port t0 t1 line t2 final c0 c1 rtt=0
    start_sink_counted "$name"
    mkdir -p "$dir/queue"
    free_port; port=$PORT
    cat >"$dir/floodgate.toml" <<EOF
$(intake_toml "$dir" "$port" full)

[delivery]
enabled = true
rate = "$RATE"
concurrency = 20

$cluster

$(sink_route "$SINK_PORT")
EOF
    serve_floodgate "$dir" "$port"
    sync
    wait_idle "$name"
    c0=$(redis_commands)
    local r0=0
    [[ -n $cluster ]] && r0=$(metric "$dir" floodgate_cluster_round_trips_total)
    python3 "$REPO/bench/sinkwait.py" "$SINK_OUT" "$MESSAGES" "$TIMEOUT" >"$TMP/wait-$name" &
    local wait_pid=$!
    PIDS+=("$wait_pid")
    log "$name: smtp-source -d -s $SESSIONS -m $MESSAGES -l $SIZE -> 127.0.0.1:$port"
    t0=$(date +%s.%N)
    smtp-source -d -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f "$SENDER" -t "$RECIPIENT" \
        -M client.test "127.0.0.1:$port" >"$TMP/source-$name.log" 2>&1 \
        || die "smtp-source against $name failed"
    t1=$(date +%s.%N)
    wait "$wait_pid" || true
    forget_pid "$wait_pid"
    line=$(cat "$TMP/wait-$name")
    [[ $line == timeout* ]] && die "$name: the sink got only ${line#timeout } of $MESSAGES messages"
    t2=${line%% *}
    c1=$(redis_commands)
    [[ -n $cluster ]] && rtt=$(( $(metric "$dir" floodgate_cluster_round_trips_total) - r0 ))
    sleep 2
    final=$(tail -c 64 "$SINK_OUT" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -n 1 | cut -d= -f2)
    [[ $final -eq $MESSAGES ]] || die "$name: sink counted $final messages, expected $MESSAGES"
    stop_pid "$FG_PID"
    stop_pid "$SINK_PID"
    echo "$name $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.3f", b - a }') $rtt $((c1 - c0))" >>"$RESULTS"
    log "$name: $(tail -n 1 "$RESULTS")"
}

start_sink_counted() {
    free_port; SINK_PORT=$PORT
    SINK_OUT=$TMP/sink-$1.out
    smtp-sink -c -u nobody "127.0.0.1:$SINK_PORT" 1024 >"$SINK_OUT" 2>"$TMP/sink-$1.err" &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    wait_port "$SINK_PORT" "$SINK_PID" smtp-sink "$TMP/sink-$1.err"
}

run off ""
run on "[cluster]
redis = \"redis://127.0.0.1:$REDIS_PORT/0\"
node = \"bench1\""

echo
echo "Cluster mode off vs on, one node: $MESSAGES messages x $SIZE bytes, $SESSIONS sessions" \
    "(smtp-source -d) -> Floodgate (synchronous = \"full\", rate \"$RATE\") -> smtp-sink;" \
    "$NPROC x $CPU_MODEL, $(date -u +%Y-%m-%d)"
awk -v m="$MESSAGES" '
    { intake[$1] = m / $2; relay[$1] = m / $3; rtt[$1] = $4; cmds[$1] = $5 }
    END {
        printf "| run | intake msg/s | relay msg/s (end to end) | Redis round trips / msg | Redis commands / msg |\n"
        printf "| --- | ---: | ---: | ---: | ---: |\n"
        printf "| off | %.0f | %.0f | - | - |\n", intake["off"], relay["off"]
        printf "| on | %.0f | %.0f | %.4f | %.4f |\n", intake["on"], relay["on"], rtt["on"] / m, cmds["on"] / m
        printf "ratio on/off: intake %.3f, relay %.3f (target >= 0.9); round trips per message %.4f (target <= 0.1)\n",
            intake["on"] / intake["off"], relay["on"] / relay["off"], rtt["on"] / m
    }' "$RESULTS"
