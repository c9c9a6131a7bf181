#!/usr/bin/env bash
# bench/compare.sh: every comparison of the performance table in one go, on one build, and
# one table of the ratios they print.
#
#   intake (reused)     bench/intake.sh --next-hop-down            smtp-source -d
#   intake (new conn)   bench/intake.sh --new-connection --next-hop-down
#   relay               bench/relay.sh                              end to end, p99
#   http                bench/http.sh                               POST /v1/messages vs SMTP
#   incident            bench/incident.sh [--pin]                   valid p99 with/without flood
#
# Each script runs side by side in itself (its receivers one after the other on the same
# machine, minutes apart at most), so its ratios are the figures to quote; absolute rates
# from different scripts are not comparable on a shared machine. Logs and full reports
# are kept in the output directory.
#
# A benchmark, not a test. Root only (the scripts install packages, run Postfix).
# Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/compare.sh [options]

      --quick          smoke run: each script's --quick (or a short incident)
      --only LIST      comma-separated subset of intake,newconn,relay,http,incident
      --pin            incident: Floodgate on CPU 0, loadgen on CPU 1 (taskset)
      --scale F        incident flood scale (default 0.1 = 800,000 failures)
      --idle-wait S    passed to every script (default 30)
      --out DIR        where reports go (default /tmp/floodgate-compare.<date>)
      --no-build       do not build first
  -h, --help           this text
EOF
}

QUICK=0
ONLY=intake,newconn,relay,http,incident
PIN=0
SCALE=0.1
IDLE_WAIT=${IDLE_WAIT:-30}
OUT=/tmp/floodgate-compare.$(date -u +%Y%m%dT%H%M%S)
BUILD=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --scale) SCALE=$2; shift 2 ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export PATH=$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin
[[ $(id -u) -eq 0 ]] || { echo "compare.sh: run as root" >&2; exit 1; }
mkdir -p "$OUT"

if [[ $BUILD -eq 1 ]]; then
    echo "[compare] cargo build --release (daemon and examples/loadgen)" >&2
    (cd "$REPO" && cargo build --release --quiet && cargo build --release --quiet --example loadgen)
fi

common=(--no-build --idle-wait "$IDLE_WAIT")
quick=()
[[ $QUICK -eq 1 ]] && quick=(--quick)
declare -A ARGS=(
    [intake]="--next-hop-down"
    [newconn]="--new-connection --next-hop-down"
    [relay]=""
    [http]=""
    [incident]="--scale $SCALE"
)
declare -A SCRIPT=([intake]=intake [newconn]=intake [relay]=relay [http]=http [incident]=incident)
[[ $PIN -eq 1 ]] && ARGS[incident]+=" --pin"
if [[ $QUICK -eq 1 ]]; then
    ARGS[incident]="--scale 0.01 --duration 10"
    [[ $PIN -eq 1 ]] && ARGS[incident]+=" --pin"
fi

FAILED=()
IFS=, read -r -a runs <<<"$ONLY"
for run in "${runs[@]}"; do
    script=${SCRIPT[$run]:-}
    [[ -n $script ]] || { echo "compare.sh: unknown run $run" >&2; exit 2; }
    extra=()
    [[ $script != incident ]] && extra=("${quick[@]}")
    # shellcheck disable=SC2206  # ARGS holds plain words
    args=(${ARGS[$run]} "${common[@]}" "${extra[@]}")
    echo "[compare] $run: bench/$script.sh ${args[*]}" >&2
    if ! "$HERE/$script.sh" "${args[@]}" >"$OUT/$run.txt" 2>"$OUT/$run.log"; then
        echo "[compare] $run failed; see $OUT/$run.log" >&2
        FAILED+=("$run")
    fi
done

echo
echo "Floodgate comparisons, $(nproc) x $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(date -u +%Y-%m-%d)"
echo "(reports: $OUT)"
echo
echo "| run | figure | value | target |"
echo "|---|---|---:|---|"
for run in "${runs[@]}"; do
    [[ -s $OUT/$run.txt ]] || continue
    # Every script ends with lines "what: value (target ...)": one row each.
    grep -E '\(target' "$OUT/$run.txt" | sed -E 's/^ +//' | awk -v run="$run" '{
        t = index($0, "(target"); head = substr($0, 1, t - 1); target = substr($0, t + 1)
        sub(/\)[^)]*$/, "", target); sub(/ +$/, "", head)
        n = split(head, w, /:? +/); value = w[n]; fig = head; sub(/:? +[^ ]+$/, "", fig); gsub(/  +/, " ", fig)
        printf "| %s | %s | %s | %s |\n", run, fig, value, target
    }'
done
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo
    echo "failed: ${FAILED[*]} (logs in $OUT)"
    exit 1
fi
