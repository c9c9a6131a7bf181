#!/usr/bin/env bash
# bench/intake.sh: SMTP intake throughput of three receivers, side by side, in one run.
#
#   smtp-sink  Postfix's accept-and-discard test server: the ceiling of the client/machine.
#   floodgate  target/release/floodgate, delivery off: accepts, checks the recipient domain
#              over DNS (a loopback dnsmasq), and answers 250 after an fsync'd SQLite commit.
#   postfix    a private Postfix instance on loopback with its default durability (cleanup
#              fsyncs every queue file); mail is put on hold so nothing is ever delivered.
#
# Each receiver gets the same load from Postfix's smtp-source: MESSAGES messages of SIZE
# bytes over SESSIONS parallel sessions, every session sending many messages over one
# connection (-d), or with --new-connection one connection per message (no -d), as legacy
# applications do. Wall-clock time is measured around smtp-source.
#
# --next-hop-down adds a row each for Floodgate and Postfix with delivery on towards a
# smarthost that refuses connections (a loopback port nobody listens on): what a dead
# next hop costs intake, next to the same daemon with delivery off.
#
# This is a benchmark, not a test: it prints figures and only fails when something
# does not work (a receiver fails to start, smtp-source gets an error, counts mismatch).
# Needs root (it installs packages and runs a Postfix instance). Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/intake.sh [options]

  -m, --messages N   messages per receiver            (env MESSAGES, default 20000)
  -s, --sessions N   parallel SMTP sessions           (env SESSIONS, default 20)
  -l, --size N       message payload in bytes         (env SIZE, default 1024)
      --sync MODE    Floodgate [queue] synchronous: full, normal or both
                                                      (env SYNC, default full)
      --quick        smoke run: 2000 messages
      --new-connection  one connection per message (smtp-source without -d)
                                                      (env NEWCONN=1)
      --next-hop-down   also Floodgate and Postfix relaying to a smarthost that
                     refuses connections (delivery on)  (env DOWN=1)
      --dkim         also measure Floodgate signing every message with DKIM: one run
                     with an RSA-2048 key, one with an Ed25519 key (first sync mode)
      --no-build     do not run `cargo build --release` first
      --keep         keep the temporary directory (logs, queues) for inspection
      --idle-wait S  before each measurement, wait up to S seconds for the machine to
                     be idle (<= 10% busy)           (env IDLE_WAIT, default 120)
                     Rows during which other programs used > 15% of the CPU are
                     marked '*' in the report.
  -h, --help         this text

Prints messages/second for smtp-sink, Floodgate and Postfix, and the ratios
Floodgate / Postfix and Floodgate / smtp-sink.
EOF
}

MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
SYNC=${SYNC:-full}
IDLE_WAIT=${IDLE_WAIT:-120}
BUILD=1
KEEP=0
DKIM=0
NEWCONN=${NEWCONN:-0}
DOWN=${DOWN:-0}
while [[ $# -gt 0 ]]; do
    case $1 in
        -m|--messages) MESSAGES=$2; shift 2 ;;
        -s|--sessions) SESSIONS=$2; shift 2 ;;
        -l|--size) SIZE=$2; shift 2 ;;
        --sync) SYNC=$2; shift 2 ;;
        --quick) MESSAGES=2000; shift ;;
        --new-connection) NEWCONN=1; shift ;;
        --next-hop-down) DOWN=1; shift ;;
        --dkim) DKIM=1; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "intake.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $IDLE_WAIT =~ ^[0-9]+$ ]] || { echo "intake.sh: IDLE_WAIT must be a number of seconds" >&2; exit 2; }
for v in MESSAGES SESSIONS SIZE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "intake.sh: $v must be a positive integer" >&2; exit 2; }
done
case $SYNC in
    full) SYNC_MODES=(full) ;;
    normal) SYNC_MODES=(normal) ;;
    both) SYNC_MODES=(full normal) ;;
    *) echo "intake.sh: --sync must be full, normal or both" >&2; exit 2 ;;
esac

SENDER=bench@client.test
RECIPIENT=user@bench.test
NAME=intake
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

# Results: one line per receiver in $TMP/results:
#   name messages seconds msg_per_s machine_busy_pct iowait_pct source_cpu_pct noisy
RESULTS=$TMP/results
: >"$RESULTS"

children_cpu() {   # sets CHILD_CPU: CPU s (user + sys) of this shell's reaped children
    times >"$TMP/times"   # not in a pipe: a forked subshell would report its own children
    CHILD_CPU=$(awk 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
        printf "%.3f", t }' "$TMP/times")
}

RECV_CPU_CMD=   # a command printing the receiver's CPU jiffies so far (user + sys)
REUSE=(-d)      # smtp-source: many messages per connection, or none for one each
[[ $NEWCONN -eq 1 ]] && REUSE=()
DOWN_PORT=      # the refusing smarthost: a free port nobody listens on
if [[ $DOWN -eq 1 ]]; then free_port; DOWN_PORT=$PORT; fi

run_source() {  # run_source NAME PORT: drive NAME with smtp-source, record the figures
    local name=$1 port=$2 t0 t1 c0 c1 s0 s1 r0 r1 pid rc=0
    sync
    wait_idle "$name"
    r0=$($RECV_CPU_CMD)
    log "$name: smtp-source ${REUSE[*]} -s $SESSIONS -m $MESSAGES -l $SIZE -> 127.0.0.1:$port"
    children_cpu; s0=$CHILD_CPU
    c0=$(cpu_sample)
    t0=$(date +%s.%N)
    # In the background and waited for, so that a signal to this script is handled at once.
    smtp-source "${REUSE[@]}" -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f "$SENDER" -t "$RECIPIENT" \
        -M client.test "127.0.0.1:$port" >"$TMP/source-$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    t1=$(date +%s.%N)
    c1=$(cpu_sample)
    children_cpu; s1=$CHILD_CPU
    r1=$($RECV_CPU_CMD)
    if [[ $rc -ne 0 ]]; then
        tail -n 20 "$TMP/source-$name.log" >&2
        die "smtp-source against $name failed (exit $rc)"
    fi
    awk -v n="$name" -v m="$MESSAGES" -v t0="$t0" -v t1="$t1" -v c0="$c0" -v c1="$c1" \
        -v s0="$s0" -v s1="$s1" -v r0="$r0" -v r1="$r1" -v hz="$HZ" -v ncpu="$NPROC" \
        'BEGIN {
            split(c0, a, " "); split(c1, b, " ")
            secs = t1 - t0; tot = b[3] - a[3]; if (tot <= 0) tot = 1
            busy = 100 * (b[1] - a[1]) / tot; src = 100 * (s1 - s0) / secs
            recv = 100 * (r1 - r0) / hz / secs
            # CPU used by neither our processes nor kernel threads: another program, noise
            other = busy - (src + recv) / ncpu - 100 * (b[4] - a[4]) / tot
            noisy = other > 15
            # busy, iowait and other: share of all CPUs; smtp-source and receiver: of one CPU
            printf "%s %d %.3f %.0f %.0f %.0f %.0f %d %.0f %.0f\n", n, m, secs, m / secs,
                busy, 100 * (b[2] - a[2]) / tot, src, noisy, recv, other
        }' >>"$RESULTS"
    log "$name: $(tail -n 1 "$RESULTS" | awk '{ printf "%s s, %s msg/s", $3, $4 }')"
}

# ---------------------------------------------------------------- the machine

DSYNC=$(dsync_ms)
log "machine: $NPROC x $CPU_MODEL; 4 KiB O_DSYNC write: ${DSYNC} ms"

# ---------------------------------------------------------------- a. smtp-sink

free_port; SINK_PORT=$PORT
# smtp-sink refuses to run as root without -u.
smtp-sink -u nobody "127.0.0.1:$SINK_PORT" 1024 >"$TMP/sink.log" 2>&1 &
SINK_PID=$!
PIDS+=("$SINK_PID")
wait_port "$SINK_PORT" "$SINK_PID" smtp-sink "$TMP/sink.log"
RECV_CPU_CMD="proc_cpu $SINK_PID"
run_source smtp-sink "$SINK_PORT"

# ---------------------------------------------------------------- b. Floodgate

start_dnsmasq --mx-host=bench.test,mx.bench.test,10 --address=/mx.bench.test/127.0.0.1

for mode in "${SYNC_MODES[@]}"; do
    name=floodgate
    [[ ${#SYNC_MODES[@]} -gt 1 || $mode != full ]] && name=floodgate-$mode
    FG_DIR=$TMP/$name
    mkdir -p "$FG_DIR/queue"
    free_port; FG_PORT=$PORT
    cat >"$FG_DIR/floodgate.toml" <<EOF
$(intake_toml "$FG_DIR" "$FG_PORT" "$mode")

[delivery]
enabled = false
EOF
    serve_floodgate "$FG_DIR" "$FG_PORT"
    RECV_CPU_CMD="proc_cpu $FG_PID"
    run_source "$name" "$FG_PORT"
    count=$(sqlite3 "$FG_DIR/queue/queue.db" 'select count(*) from messages')
    log "$name: queue.db holds $count messages (expected $MESSAGES)"
    [[ $count -eq $MESSAGES ]] || die "$name queued $count messages, expected $MESSAGES"
    stop_pid "$FG_PID"
done

# A dead next hop: delivery on, every domain to a smarthost that refuses connections.
# Every message is accepted and queued all the same; the scheduler's part is what this
# row measures against the delivery-off one above.
if [[ $DOWN -eq 1 ]]; then
    name=floodgate-down
    FG_DIR=$TMP/$name
    mkdir -p "$FG_DIR/queue"
    free_port; FG_PORT=$PORT
    cat >"$FG_DIR/floodgate.toml" <<EOF
$(intake_toml "$FG_DIR" "$FG_PORT" "${SYNC_MODES[0]}")

[delivery]
enabled = true

[[route]]
domains = ["*"]
transport = "smarthost"
host = "127.0.0.1"
port = $DOWN_PORT
tls = "none"
EOF
    serve_floodgate "$FG_DIR" "$FG_PORT"
    RECV_CPU_CMD="proc_cpu $FG_PID"
    run_source "$name" "$FG_PORT"
    count=$(sqlite3 "$FG_DIR/queue/queue.db" 'select count(*) from messages')
    attempts=$(sqlite3 "$FG_DIR/queue/queue.db" 'select coalesce(sum(attempts), 0) from recipients')
    log "$name: queue.db holds $count messages (expected $MESSAGES); $attempts delivery attempts recorded"
    [[ $count -eq $MESSAGES ]] || die "$name queued $count messages, expected $MESSAGES"
    stop_pid "$FG_PID"
fi

# Signing: the same intake with a key for the From: domain smtp-source writes, so every
# message is signed before its commit. Each must come out signed, or the run is void.
if [[ $DKIM -eq 1 ]]; then
    for alg in rsa-sha256 ed25519-sha256; do
        name=floodgate-${alg%%-*}
        FG_DIR=$TMP/$name
        mkdir -p "$FG_DIR/queue" "$FG_DIR/dkim"
        "$FLOODGATE" dkim-keygen --domain "${SENDER#*@}" --selector bench --algorithm "$alg" \
            --out "$FG_DIR/dkim" >"$FG_DIR/keygen.log" 2>&1 || die "dkim-keygen $alg failed"
        free_port; FG_PORT=$PORT
        cat >"$FG_DIR/floodgate.toml" <<EOF
$(intake_toml "$FG_DIR" "$FG_PORT" "${SYNC_MODES[0]}")

[delivery]
enabled = false

[[dkim]]
domain = "${SENDER#*@}"
selector = "bench"
key = "$FG_DIR/dkim/bench.${SENDER#*@}.key"
algorithm = "$alg"
EOF
        serve_floodgate "$FG_DIR" "$FG_PORT"
        RECV_CPU_CMD="proc_cpu $FG_PID"
        run_source "$name" "$FG_PORT"
        signed=$(sqlite3 "$FG_DIR/queue/queue.db" \
            "select count(*) from bodies where instr(body, cast('DKIM-Signature:' as blob)) = 1")
        log "$name: $signed of $MESSAGES queued messages carry a DKIM-Signature"
        [[ $signed -eq $MESSAGES ]] || die "$name signed $signed messages, expected $MESSAGES"
        stop_pid "$FG_PID"
    done
fi

# ---------------------------------------------------------------- c. Postfix

PF=$TMP/postfix
free_port; PF_PORT=$PORT
# Intake only, like Floodgate with delivery off: every message is accepted, written and
# fsync'd by cleanup as usual, but lands in the hold queue so the queue manager never
# tries to deliver it (and nothing leaves the machine).
start_postfix "$PF" "$PF_PORT" "smtpd_data_restrictions = check_client_access static:HOLD"
log "postfix: $(postconf -c "$PF/etc" -h mail_version) on 127.0.0.1:$PF_PORT"
RECV_CPU_CMD="postfix_cpu $PF_MASTER"
run_source postfix "$PF_PORT"
count=$(find "$PF/spool/hold" -type f | wc -l)
log "postfix: hold queue holds $count messages (expected $MESSAGES)"
[[ $count -eq $MESSAGES ]] || die "postfix queued $count messages, expected $MESSAGES"

# The same dead next hop for Postfix: no hold, relayhost = the refusing port. The first
# instance is stopped first so that its daemons do not count here.
if [[ $DOWN -eq 1 ]]; then
    postfix -c "$PF/etc" stop >/dev/null 2>&1 || true
    PF=$TMP/postfix-down
    free_port; PF_PORT=$PORT
    start_postfix "$PF" "$PF_PORT" "relayhost = [127.0.0.1]:$DOWN_PORT"
    RECV_CPU_CMD="postfix_cpu $PF_MASTER"
    run_source postfix-down "$PF_PORT"
    sleep 1   # cleanup hands the last files to the queue manager
    count=$(find "$PF/spool/incoming" "$PF/spool/active" "$PF/spool/deferred" "$PF/spool/maildrop" -type f | wc -l)
    log "postfix-down: queues hold $count messages (expected $MESSAGES)"
    [[ $count -eq $MESSAGES ]] || die "postfix-down queued $count messages, expected $MESSAGES"
fi

# ---------------------------------------------------------------- report

fg_name=floodgate
[[ ${#SYNC_MODES[@]} -gt 1 || ${SYNC_MODES[0]} != full ]] && fg_name=floodgate-${SYNC_MODES[0]}
echo
how="smtp-source -d: connections reused"
[[ $NEWCONN -eq 1 ]] && how="smtp-source without -d: a new connection per message"
echo "SMTP intake: $MESSAGES messages x $SIZE bytes, $SESSIONS sessions ($how)," \
    "$NPROC x $CPU_MODEL, $(date -u +%Y-%m-%d)"
echo
awk -v fg="$fg_name" '
    { name[NR] = $1; m[NR] = $2; s[NR] = $3; r[NR] = $4; busy[NR] = $5; io[NR] = $6; src[NR] = $7
      mark[NR] = $8 ? "*" : " "; if ($8) noisy = 1; recv[NR] = $9; other[NR] = $10; rate[$1] = $4 }
    END {
        printf "| %-16s | %8s | %7s | %8s | %8s | %6s | %10s | %12s | %5s |\n", "receiver", "messages", "seconds", "msg/s", "CPU busy", "iowait", "source CPU", "receiver CPU", "other"
        printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "------------------", "---------:", "--------:", "---------:", "---------:", "-------:", "-----------:", "-------------:", "------:"
        for (i = 1; i <= NR; i++)
            printf "| %-16s | %8d | %7.2f | %7d%s | %7d%% | %5d%% | %9d%% | %11d%% | %4d%% |\n", name[i], m[i], s[i], r[i], mark[i], busy[i], io[i], src[i], recv[i], other[i]
        print ""
        for (i = 1; i <= NR; i++) if (name[i] ~ /^floodgate/) {
            n = name[i]; pf = (n == "floodgate-down" ? "postfix-down" : "postfix")
            printf "%-16s / %-13s %6.2fx   (target >= 6x)\n", n, pf ":", rate[n] / rate[pf]
            printf "%-16s / smtp-sink:    %6.1f%%   (target >= 60%%)\n", n, 100 * rate[n] / rate["smtp-sink"]
        }
        if ("floodgate-down" in rate)
            printf "%-16s / %-13s %6.1f%%   (target >= 95%%: a dead next hop costs intake <= 5%%)\n", "floodgate-down", fg ":", 100 * rate["floodgate-down"] / rate[fg]
        for (i = 1; i <= NR; i++) if (name[i] ~ /^floodgate-(rsa|ed25519)$/)
            printf "%-16s / %s: %6.1f%%   (target >= 90%% for ed25519)\n", name[i], fg, 100 * rate[name[i]] / rate[fg]
        if (noisy) print "\n* machine busy with something else before or during this measurement (other > 15%): rerun"
    }' "$RESULTS"
echo
echo "CPU busy, iowait, other: share of all $NPROC CPUs during the run (other = busy minus"
echo "smtp-source, receiver and kernel threads: other programs). source CPU, receiver CPU:"
echo "smtp-source's and the receiver's own processes, share of one CPU (100% = one core)."
