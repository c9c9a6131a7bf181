#!/usr/bin/env bash
# bench/relay.sh: end-to-end relay throughput, Floodgate vs Postfix, side by side in one run.
#
#   smtp-source -> Floodgate -> smtp-sink   (delivery on, synchronous = "full", MX from a
#                                            loopback dnsmasq pointing at the sink)
#   smtp-source -> Postfix   -> smtp-sink   (private instance, relayhost = the sink,
#                                            default durability)
#
# Messages per second are end to end: from the moment smtp-source starts to the moment the
# sink has received the last message (smtp-sink -c counters, polled every 5 ms by
# bench/sinkwait.py). Also prints Floodgate's accept-to-delivery latency p50/p99 from
# queue.db (recipients.updated_at - messages.received_at for delivered recipients) and
# Postfix's from its log (delay= of status=sent lines).
#
# A benchmark, not a test: it fails only when something does not work (a daemon does not
# start, a message goes missing or arrives twice). Root only. Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/relay.sh [options]

  -m, --messages N   messages per relay                (env MESSAGES, default 20000)
  -s, --sessions N   parallel smtp-source sessions     (env SESSIONS, default 20)
  -l, --size N       message payload in bytes          (env SIZE, default 1024)
      --rate R       Floodgate [delivery] rate          (env RATE, default 100000/s)
      --concurrency N  Floodgate [delivery] concurrency (env CONCURRENCY, default 20)
      --sync MODE    Floodgate [queue] synchronous      (env SYNC, default full)
      --quick        smoke run: 2000 messages
      --no-build     do not run `cargo build --release` first
      --keep         keep the temporary directory (logs, queues)
      --idle-wait S  wait up to S s for an idle machine before each row (default 120)
      --timeout S    give up on a relay after S s (default 600)
  -h, --help         this text
EOF
}

MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
RATE=${RATE:-100000/s}
CONCURRENCY=${CONCURRENCY:-20}
SYNC=${SYNC:-full}
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
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --sync) SYNC=$2; shift 2 ;;
        --quick) MESSAGES=2000; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "relay.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in MESSAGES SESSIONS SIZE CONCURRENCY IDLE_WAIT TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "relay.sh: $v must be a positive integer" >&2; exit 2; }
done
[[ $SYNC == full || $SYNC == normal ]] || { echo "relay.sh: --sync must be full or normal" >&2; exit 2; }

NAME=relay
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SENDER=bench@client.test
RECIPIENT=user@bench.test

need_root
install_prereqs
if [[ $BUILD -eq 1 ]]; then build_release; else FLOODGATE=$REPO/target/release/floodgate; fi
[[ -x $FLOODGATE ]] || die "$FLOODGATE missing (run without --no-build)"

log "machine: $NPROC x $CPU_MODEL; 4 KiB O_DSYNC write: $(dsync_ms) ms"

RESULTS=$TMP/results
: >"$RESULTS"

start_sink() {  # start_sink NAME: a fresh smtp-sink with counters; sets SINK_PORT SINK_PID SINK_OUT
    free_port; SINK_PORT=$PORT
    SINK_OUT=$TMP/sink-$1.out
    smtp-sink -c -u nobody "127.0.0.1:$SINK_PORT" 1024 >"$SINK_OUT" 2>"$TMP/sink-$1.err" &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    wait_port "$SINK_PORT" "$SINK_PID" smtp-sink "$TMP/sink-$1.err"
}

sink_count() { tail -c 64 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -n 1 | cut -d= -f2; }

# relay_run NAME PORT CPU_CMD: smtp-source into PORT, wait for the sink; appends to RESULTS
#   name messages total_s intake_s msg_per_s busy_pct relay_cpu_pct other_pct noisy
relay_run() {
    local name=$1 port=$2 cpu_cmd=$3 t0 t1 t2 c0 c1 r0 r1 snk0 snk1 src_pid wait_pid rc=0 line
    sync
    wait_idle "$name"
    r0=$($cpu_cmd); snk0=$(proc_cpu "$SINK_PID")
    c0=$(cpu_sample)
    python3 "$REPO/bench/sinkwait.py" "$SINK_OUT" "$MESSAGES" "$TIMEOUT" >"$TMP/wait-$name" &
    wait_pid=$!
    PIDS+=("$wait_pid")
    log "$name: smtp-source -d -s $SESSIONS -m $MESSAGES -l $SIZE -> 127.0.0.1:$port -> sink 127.0.0.1:$SINK_PORT"
    t0=$(date +%s.%N)
    smtp-source -d -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f "$SENDER" -t "$RECIPIENT" \
        -M client.test "127.0.0.1:$port" >"$TMP/source-$name.log" 2>&1 &
    src_pid=$!
    PIDS+=("$src_pid")
    wait "$src_pid" || rc=$?
    forget_pid "$src_pid"
    t1=$(date +%s.%N)
    [[ $rc -eq 0 ]] || { tail -n 20 "$TMP/source-$name.log" >&2; die "smtp-source against $name failed (exit $rc)"; }
    wait "$wait_pid" || true
    forget_pid "$wait_pid"
    c1=$(cpu_sample)
    r1=$($cpu_cmd); snk1=$(proc_cpu "$SINK_PID")
    line=$(cat "$TMP/wait-$name")
    [[ $line == timeout* ]] && die "$name: the sink got only ${line#timeout } of $MESSAGES messages in ${TIMEOUT}s"
    t2=${line%% *}
    # Anything arriving after the last expected message is a duplicate.
    sleep 2
    local final
    final=$(sink_count "$SINK_OUT")
    log "$name: sink counted $final messages (expected $MESSAGES)"
    [[ $final -eq $MESSAGES ]] || die "$name: sink counted $final messages, expected $MESSAGES"
    awk -v n="$name" -v m="$MESSAGES" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v c0="$c0" -v c1="$c1" \
        -v r0="$r0" -v r1="$r1" -v s0="$snk0" -v s1="$snk1" -v hz="$HZ" -v ncpu="$NPROC" 'BEGIN {
            split(c0, a, " "); split(c1, b, " "); tot = b[3] - a[3]; if (tot <= 0) tot = 1
            secs = t2 - t0; isecs = t1 - t0
            busy = 100 * (b[1] - a[1]) / tot
            recv = 100 * (r1 - r0) / hz / secs; sink = 100 * (s1 - s0) / hz / secs
            # smtp-source and sinkwait are not sampled: "other" is an upper bound on noise
            kt = b[4] - a[4]; if (kt < 0) kt = 0   # a busy kernel thread that exited
            other = busy - (recv + sink) / ncpu - 100 * kt / tot
            printf "%s %d %.3f %.3f %.0f %.0f %.0f %.0f %.0f\n", n, m, secs, isecs, m / secs, busy, recv, sink, other
        }' >>"$RESULTS"
    log "$name: $(tail -n 1 "$RESULTS" | awk '{ printf "%s s end to end (intake %s s), %s msg/s", $3, $4, $5 }')"
}

# ---------------------------------------------------------------- DNS: bench.test MX -> 127.0.0.1

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1

# ---------------------------------------------------------------- a. Floodgate

start_sink floodgate
FG_DIR=$TMP/floodgate
mkdir -p "$FG_DIR/queue"
free_port; FG_PORT=$PORT
cat >"$FG_DIR/floodgate.toml" <<EOF
$(intake_toml "$FG_DIR" "$FG_PORT" "$SYNC")

[delivery]
enabled = true
rate = "$RATE"
concurrency = $CONCURRENCY

$(sink_route "$SINK_PORT")
EOF
serve_floodgate "$FG_DIR" "$FG_PORT"
relay_run floodgate "$FG_PORT" "proc_cpu $FG_PID"
stop_pid "$FG_PID"
stop_pid "$SINK_PID"
Q=$FG_DIR/queue/queue.db
read -r fg_del fg_p50 fg_p99 fg_max < <(sqlite3 -separator ' ' "$Q" "
    WITH l AS (SELECT r.updated_at - m.received_at AS ms FROM recipients r JOIN messages m ON m.id = r.message_id WHERE r.state = 1),
         o AS (SELECT ms, ROW_NUMBER() OVER (ORDER BY ms) AS k, COUNT(*) OVER () AS n FROM l)
    SELECT n, MAX(CASE WHEN k = CAST((n - 1) * 0.50 AS INT) + 1 THEN ms END),
              MAX(CASE WHEN k = CAST((n - 1) * 0.99 AS INT) + 1 THEN ms END), MAX(ms) FROM o")
log "floodgate: $fg_del recipients delivered in queue.db; accept-to-delivery p50 ${fg_p50} ms, p99 ${fg_p99} ms, max ${fg_max} ms"
[[ $fg_del -eq $MESSAGES ]] || die "floodgate: queue.db shows $fg_del delivered recipients, expected $MESSAGES"

# ---------------------------------------------------------------- b. Postfix

start_sink postfix
PF=$TMP/postfix
free_port; PF_PORT=$PORT
start_postfix "$PF" "$PF_PORT" "relayhost = [127.0.0.1]:$SINK_PORT"
log "postfix: $(postconf -c "$PF/etc" -h mail_version) on 127.0.0.1:$PF_PORT, relayhost [127.0.0.1]:$SINK_PORT"
relay_run postfix "$PF_PORT" "postfix_cpu $PF_MASTER"
sleep 1   # postlogd writes asynchronously
read -r pf_del pf_p50 pf_p99 pf_max < <(grep -o 'delay=[0-9.]*, .*status=sent' "$PF/maillog" \
    | sed 's/^delay=\([0-9.]*\),.*/\1/' | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR == 0) { print 0, "-", "-", "-"; exit }
        printf "%d %.0f %.0f %.0f\n", NR, 1000 * v[int((NR - 1) * 0.50) + 1], 1000 * v[int((NR - 1) * 0.99) + 1], 1000 * v[NR] }')
log "postfix: $pf_del status=sent lines; delay p50 ${pf_p50} ms, p99 ${pf_p99} ms, max ${pf_max} ms (Postfix logs delay with 10 ms resolution)"

# ---------------------------------------------------------------- report

echo
echo "SMTP relay end to end: $MESSAGES messages x $SIZE bytes, $SESSIONS sessions (smtp-source -d) ->" \
    "relay -> smtp-sink; Floodgate synchronous = \"$SYNC\", [delivery] rate = \"$RATE\"," \
    "concurrency = $CONCURRENCY; $NPROC x $CPU_MODEL, $(date -u +%Y-%m-%d)"
echo
awk -v fp50="$fg_p50" -v fp99="$fg_p99" -v pp50="$pf_p50" -v pp99="$pf_p99" '
    { name[NR] = $1; m[NR] = $2; s[NR] = $3; is[NR] = $4; r[NR] = $5; busy[NR] = $6; recv[NR] = $7; sink[NR] = $8; other[NR] = $9; rate[$1] = $5 }
    END {
        p50["floodgate"] = fp50; p99["floodgate"] = fp99; p50["postfix"] = pp50; p99["postfix"] = pp99
        printf "| %-9s | %8s | %13s | %8s | %7s | %7s | %7s | %8s | %10s | %8s | %5s |\n", "relay", "messages", "end-to-end s", "intake s", "msg/s", "p50 ms", "p99 ms", "CPU busy", "relay CPU", "sink CPU", "other"
        printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "-----------", "---------:", "--------------:", "---------:", "--------:", "--------:", "--------:", "---------:", "-----------:", "---------:", "------:"
        for (i = 1; i <= NR; i++)
            printf "| %-9s | %8d | %13.2f | %8.2f | %7d | %7s | %7s | %7d%% | %9d%% | %7d%% | %4d%% |\n", name[i], m[i], s[i], is[i], r[i], p50[name[i]], p99[name[i]], busy[i], recv[i], sink[i], other[i]
        print ""
        printf "floodgate / postfix (end-to-end msg/s): %.2fx   (target >= 6x)\n", rate["floodgate"] / rate["postfix"]
        printf "floodgate accept-to-delivery p99 ms: %s   (target <= 250)\n", fp99
    }' "$RESULTS"
echo
echo "end-to-end s: smtp-source start to the sink counting the last message; intake s: until"
echo "smtp-source exits (all messages acknowledged). p50/p99: accept-to-delivery latency"
echo "(Floodgate: queue.db received_at -> updated_at; Postfix: delay= in its log). CPU busy,"
echo "other: share of all $NPROC CPUs (other = busy minus relay, sink and kernel threads, so it"
echo "includes smtp-source: an upper bound on noise). relay CPU, sink CPU: share of one CPU."
