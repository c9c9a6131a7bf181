# shellcheck shell=bash disable=SC2034,SC2153
# bench/lib.sh: helpers shared by bench/intake.sh, bench/relay.sh, bench/incident.sh,
# bench/http.sh, bench/chaos.sh and bench/retention.sh.
#
# Conventions: free ports on 127.0.0.1, a scratch directory removed at exit, a quiet-machine
# wait before each measurement, CPU accounting that flags rows disturbed by other programs.
# Source it after setting NAME (log prefix)
# and KEEP (1 = keep the scratch directory).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin

log() { printf '[%s] %s\n' "$NAME" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$NAME" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root: it installs packages and runs private daemons"
}

install_prereqs() {   # install_prereqs [extra-package:command ...]
    local missing=() pc
    command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null && command -v postfix >/dev/null \
        || missing+=(postfix)
    command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
    command -v sqlite3 >/dev/null || missing+=(sqlite3)
    command -v curl >/dev/null || missing+=(curl)
    for pc in "$@"; do command -v "${pc#*:}" >/dev/null || missing+=("${pc%%:*}"); done
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing ${missing[*]}"
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt-get update -qq
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    for c in smtp-source smtp-sink postfix dnsmasq sqlite3 curl python3; do
        command -v "$c" >/dev/null || die "$c not found after install"
    done
}

build_release() {   # build_release [cargo args...]: release build of the daemon (+ args)
    log "cargo build --release $*"
    (cd "$REPO" && cargo build --release --quiet "$@")
    FLOODGATE=$REPO/target/release/floodgate
    [[ -x $FLOODGATE ]] || die "$FLOODGATE missing"
}

# ---------------------------------------------------------------- scratch and cleanup

TMP=$(mktemp -d "/tmp/floodgate-$NAME.XXXXXX")
chmod 755 "$TMP"    # Postfix daemons run as user postfix and must traverse it
PIDS=()
POSTFIX_CONFS=()

cleanup() {
    local rc=$?
    set +e
    local conf pidfile pid
    for conf in "${POSTFIX_CONFS[@]}"; do
        postfix -c "$conf" stop >/dev/null 2>&1
        pidfile=$(postconf -c "$conf" -h queue_directory)/pid/master.pid
        if [[ -f $pidfile ]]; then
            pid=$(tr -dc 0-9 <"$pidfile")
            for _ in $(seq 50); do [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
    done
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if [[ $KEEP -eq 1 || $rc -ne 0 ]]; then
        log "kept $TMP (logs, queues)"
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {  # drop a reaped process from PIDS, so cleanup never signals a reused pid
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

stop_pid() {    # stop_pid PID: TERM, wait (bounded), forget
    local pid=$1
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# ---------------------------------------------------------------- ports

USED_PORTS=" "
port_busy() {   # in /proc/net/{tcp,udp}[6] as a local port, or already handed out
    local hex
    hex=$(printf '%04X' "$1")
    [[ $USED_PORTS == *" $1 "* ]] && return 0
    awk -v h="$hex" 'FNR > 1 { split($2, a, ":"); if (a[2] == h) found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 2>/dev/null
}
free_port() {   # sets PORT
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 30000))
        if ! port_busy "$p"; then USED_PORTS+="$p "; PORT=$p; return; fi
    done
    die "no free port found"
}

wait_port() {   # wait_port PORT PID NAME LOG: until PORT accepts a TCP connection
    local port=$1 pid=$2 name=$3 logf=$4
    for _ in $(seq 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$logf" >&2 || true
            die "$name exited before listening on 127.0.0.1:$port"
        fi
        sleep 0.1
    done
    tail -n 30 "$logf" >&2 || true
    die "$name not listening on 127.0.0.1:$port after 30 s"
}

# ---------------------------------------------------------------- CPU accounting

NPROC=$(nproc)
HZ=$(getconf CLK_TCK)
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)

cpu_sample() {  # "busy iowait total kthreads" jiffies, all CPUs; kthreads = kernel threads' CPU
    local k
    k=$(awk 'FNR == 1 { sub(/^.*\) /, ""); if ($2 == 2) t += $12 + $13 } END { print t + 0 }' \
        /proc/[0-9]*/stat 2>/dev/null || true)
    awk -v k="${k:-0}" '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, $6, t, k }' /proc/stat
}

busy_pct() {    # sets BUSY: % of all CPUs busy over the next second
    local a b
    a=$(cpu_sample); sleep 1; b=$(cpu_sample)
    BUSY=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ")
        t = y[3] - x[3]; printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }')
}

wait_idle() {   # wait (up to IDLE_WAIT s) for 3 idle seconds in a row; best effort
    local name=$1 waited=0 calm=0
    while [[ $calm -lt 3 ]]; do
        busy_pct
        if [[ $BUSY -le 10 ]]; then calm=$((calm + 1)); continue; fi
        calm=0
        if [[ $waited -ge $IDLE_WAIT ]]; then
            log "warning: machine still ${BUSY}% busy; measuring $name anyway"
            return
        fi
        [[ $waited -eq 0 ]] && log "machine ${BUSY}% busy: waiting up to ${IDLE_WAIT}s for it to settle"
        waited=$((waited + 1))
    done
}

proc_cpu() {    # proc_cpu PID [with_children]: utime + stime (+ cutime + cstime), jiffies
    awk -v c="${2:-0}" '{ sub(/^.*\) /, ""); print $12 + $13 + (c ? $14 + $15 : 0) }' "/proc/$1/stat" 2>/dev/null || echo 0
}

postfix_cpu() { # postfix_cpu MASTER_PID: master with its reaped children, plus live daemons of user postfix
    local t pid
    t=$(proc_cpu "$1" 1)
    for pid in $(ps -u postfix -o pid=); do t=$((t + $(proc_cpu "$pid"))); done
    echo "$t"
}

other_pct() {   # other_pct C0 C1 OURS_JIFFIES: % of all CPUs used by other programs between samples
    awk -v c0="$1" -v c1="$2" -v ours="$3" -v ncpu="$NPROC" 'BEGIN {
        split(c0, a, " "); split(c1, b, " "); tot = b[3] - a[3]; if (tot <= 0) tot = 1
        # /proc/stat totals are in jiffies summed over CPUs; ours is in jiffies of one task
        printf "%.0f", 100 * (b[1] - a[1] - ours - (b[4] - a[4])) / tot }'
}

dsync_ms() {    # latency of a 4 KiB O_DSYNC write in the scratch directory
    (cd "$TMP" && dd if=/dev/zero of=dsync.test bs=4k count=500 oflag=dsync 2>&1 \
        | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") printf "%.2f", $(i - 1) * 1000 / 500 }')
    rm -f "$TMP/dsync.test"
}

# ---------------------------------------------------------------- daemons

start_dnsmasq() {   # start_dnsmasq ARGS...: authoritative for *.test, never forwards; sets DNS_PORT
    free_port; DNS_PORT=$PORT
    dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll --bind-interfaces \
        --listen-address=127.0.0.1 --port="$DNS_PORT" --pid-file= --user=root \
        --local=/test/ "$@" --log-facility=- >"$TMP/dnsmasq.log" 2>&1 &
    DNS_PID=$!
    PIDS+=("$DNS_PID")
    for _ in $(seq 50); do
        grep -q 'started' "$TMP/dnsmasq.log" 2>/dev/null && return
        kill -0 "$DNS_PID" 2>/dev/null || { cat "$TMP/dnsmasq.log" >&2; die "dnsmasq failed"; }
        sleep 0.1
    done
    die "dnsmasq did not start"
}

start_floodgate() {   # start_floodgate DIR: runs DIR/floodgate.toml; sets FG_PID
    local dir=$1
    "$FLOODGATE" serve --config "$dir/floodgate.toml" 2>"$dir/floodgate.log" &
    FG_PID=$!
    PIDS+=("$FG_PID")
    for _ in $(seq 300); do
        grep -q 'smtp listening' "$dir/floodgate.log" 2>/dev/null && return
        kill -0 "$FG_PID" 2>/dev/null || { tail -n 30 "$dir/floodgate.log" >&2; die "floodgate exited"; }
        sleep 0.1
    done
    die "floodgate did not start"
}

serve_floodgate() {   # serve_floodgate DIR SMTP_PORT: start_floodgate, then wait for SMTP_PORT
    start_floodgate "$1"
    wait_port "$2" "$FG_PID" floodgate "$1/floodgate.log"
}

# ---------------------------------------------------------------- config pieces

# intake_toml DIR SMTP_PORT SYNC: [server] to [dns] of a Floodgate that takes a flood from
# one address (smtp-source), its queue in DIR/queue, DNS from start_dnsmasq.
intake_toml() {
    cat <<EOF
[server]
hostname = "bench.floodgate"

[smtp]
listen = ["127.0.0.1:$2"]
max_connections = 1000
max_connections_per_ip = 1000

[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "bench-admin-token-0123456789abcdef"

[queue]
dir = "$1/queue"
synchronous = "$3"

[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]
EOF
}

sink_route() {   # sink_route PORT: the [[route]] sending every domain to a loopback sink on PORT
    cat <<EOF
[[route]]
domains = ["*"]
transport = "mx"
port = $1
tls = "none"
EOF
}

# start_postfix DIR PORT EXTRA_MAIN_CF: a private Postfix instance, smtpd on 127.0.0.1:PORT;
# sets PF_MASTER. Debian's master.cf minus chroot.
start_postfix() {
    local pf=$1 port=$2 extra=$3
    mkdir -p "$pf/etc" "$pf/spool" "$pf/data"
    chown postfix "$pf/data"
    cat >"$pf/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $pf/spool
data_directory = $pf/data
myhostname = bench.postfix
mydomain = postfix.invalid
myorigin = \$myhostname
mydestination =
relay_domains =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
biff = no
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
$extra
EOF
    cat >"$pf/etc/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
pickup     unix n - n 60 1 pickup
cleanup    unix n - n - 0 cleanup
qmgr       unix n - n 300 1 qmgr
rewrite    unix - - n - - trivial-rewrite
bounce     unix - - n - 0 bounce
defer      unix - - n - 0 bounce
trace      unix - - n - 0 bounce
verify     unix - - n - 1 verify
flush      unix n - n 1000? 0 flush
proxymap   unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp       unix - - n - - smtp
relay      unix - - n - - smtp
showq      unix n - n - - showq
error      unix - - n - - error
retry      unix - - n - - error
discard    unix - - n - - discard
local      unix - n n - - local
anvil      unix - - n - 1 anvil
scache     unix - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
EOF
    POSTFIX_CONFS+=("$pf/etc")
    postfix -c "$pf/etc" check >"$pf/check.log" 2>&1 || { cat "$pf/check.log" "$pf/maillog" >&2 2>/dev/null; die "postfix check failed"; }
    postfix -c "$pf/etc" start >"$pf/start.log" 2>&1 || { cat "$pf/start.log" "$pf/maillog" >&2 2>/dev/null; die "postfix start failed"; }
    wait_port "$port" "" postfix "$pf/maillog"
    PF_MASTER=$(tr -dc 0-9 <"$pf/spool/pid/master.pid")
}
