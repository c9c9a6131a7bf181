#!/usr/bin/env bash
# Offline checks for the shipped systemd integration files.
#
# Usage: systemd/verify.sh [PATH_TO_BUILT_FLOODGATE_BINARY]
#        e.g. systemd/verify.sh target/debug/floodgate
#
# 1. systemd-analyze verify   floodgate.service  (byte-identical copy, checked
#    inside a throw-away root so that /usr/bin/floodgate can be provided
#    without touching the host)
# 2. systemd-analyze security floodgate.service  (exposure must be <= 2.0)
# 3. systemd-sysusers --dry-run floodgate.sysusers (must parse and create
#    the floodgate user and group)
# 4. systemd-analyze verify   floodgate-backup.service and .timer (the nightly
#    backup example)
#
# Needs no running systemd (works in containers where systemd is not PID 1).
# If systemd-analyze/systemd-sysusers or /bin/kill (used by ExecReload=) are
# missing, the Debian packages `systemd` / `procps` are installed with apt-get
# (requires root).
set -euo pipefail

MAX_EXPOSURE="2.0"   # systemd-analyze prints one decimal; --threshold is in tenths
THRESHOLD_TENTHS=20

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UNIT="$here/floodgate.service"
SYSUSERS="$here/floodgate.sysusers"
BIN="${1:-}"

fail() { echo "verify.sh: FAIL: $*" >&2; exit 1; }
info() { echo "verify.sh: $*"; }

[ -f "$UNIT" ] || fail "missing $UNIT"
[ -f "$SYSUSERS" ] || fail "missing $SYSUSERS"
BACKUP_UNITS=(floodgate-backup.service floodgate-backup.timer)
for u in "${BACKUP_UNITS[@]}"; do [ -f "$here/$u" ] || fail "missing $here/$u"; done
if [ -n "$BIN" ]; then
    [ -f "$BIN" ] && [ -x "$BIN" ] || fail "binary '$BIN' does not exist or is not executable"
    BIN="$(readlink -f "$BIN")"
fi

# --- 0. tools ---------------------------------------------------------------
need_pkgs=()
command -v systemd-analyze  >/dev/null 2>&1 || need_pkgs+=(systemd)
command -v systemd-sysusers >/dev/null 2>&1 || need_pkgs+=(systemd)
[ -x /bin/kill ] || need_pkgs+=(procps)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
    [ "$(id -u)" -eq 0 ] || fail "need packages: ${need_pkgs[*]} (run as root or install them first)"
    info "installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null \
        || fail "apt-get install ${need_pkgs[*]} failed"
fi
info "using $(systemd-analyze --version | head -n1)"

work="$(mktemp -d "${TMPDIR:-/tmp}/floodgate-verify.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- 1. systemd-analyze verify ----------------------------------------------
# Throw-away root: the host's unit library (for network-online.target,
# sysinit.target, ...), the unit exactly as shipped, /bin/kill for
# ExecReload=, and /usr/bin/floodgate (the real binary if given, else a stub).
root="$work/root"
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"                      # merged-/usr layout, as on Debian 12
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$(readlink -f /bin/kill)" "$root/usr/bin/kill"
cp "$UNIT" "$root/etc/systemd/system/floodgate.service"
cmp -s "$UNIT" "$root/etc/systemd/system/floodgate.service" || fail "unit copy differs"

if [ -n "$BIN" ]; then
    cp "$BIN" "$root/usr/bin/floodgate"
    info "checking the unit against the real binary $BIN"
    # The subcommands and option used by ExecStartPre=/ExecStart= must exist.
    for sub in serve check-config; do
        out="$(cd "$work" && timeout 20 "$BIN" "$sub" --help 2>&1)" \
            || fail "'$BIN $sub --help' failed: the unit runs '$sub --config ...'"
        grep -q -- '--config' <<<"$out" \
            || fail "'$BIN $sub' has no --config option, but the unit passes one"
    done
else
    printf '#!/bin/sh\nexit 0\n' > "$root/usr/bin/floodgate"
    chmod 0755 "$root/usr/bin/floodgate"
    info "NOTE: no binary given; /usr/bin/floodgate is a stub inside the temporary root"
fi

run_verify() {
    systemd-analyze verify --man=no --root="$root" /etc/systemd/system/floodgate.service 2>&1
}
set +e; out="$(run_verify)"; rc=$?; set -e
out="${out//$root/}"
# systemd-analyze verify only warns (exit 0) about unknown keys or bad values;
# treat any diagnostic at all as a failure.
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify floodgate.service (exit $rc)"
fi
info "OK: systemd-analyze verify floodgate.service"

# Self-test: the verifier must notice a missing ExecStart= binary, otherwise
# the check above proves nothing (e.g. if a future systemd ignored --root).
mv "$root/usr/bin/floodgate" "$root/usr/bin/floodgate.away"
set +e; out="$(run_verify)"; rc=$?; set -e
mv "$root/usr/bin/floodgate.away" "$root/usr/bin/floodgate"
if [ "$rc" -eq 0 ] || ! grep -q '/usr/bin/floodgate' <<<"$out"; then
    fail "self-test: systemd-analyze verify did not reject a missing /usr/bin/floodgate"
fi

# --- 2. systemd-analyze security --------------------------------------------
set +e
report="$(systemd-analyze security --offline=true --root="$root" --no-pager \
            --threshold="$THRESHOLD_TENTHS" /etc/systemd/system/floodgate.service 2>&1)"
rc=$?
set -e
score="$(sed -n 's/.*Overall exposure level for floodgate\.service: \([0-9][0-9.]*\).*/\1/p' <<<"$report")"
if [ -z "$score" ]; then
    printf '%s\n' "$report" >&2
    fail "could not read the overall exposure level from systemd-analyze security"
fi
if [ "$rc" -ne 0 ] || ! awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
    printf '%s\n' "$report" | grep -v '^✓' >&2 || true
    fail "exposure level $score exceeds $MAX_EXPOSURE"
fi
info "OK: systemd-analyze security exposure = $score (max $MAX_EXPOSURE)"

# --- 3. systemd-sysusers --dry-run ------------------------------------------
# Read from stdin against an empty root, so the host's /etc/passwd neither
# matters nor gets touched. Syntax errors make systemd-sysusers exit non-zero.
sroot="$work/sysusers-root"
mkdir -p "$sroot"
set +e
out="$(systemd-sysusers --dry-run --root="$sroot" - < "$SYSUSERS" 2>&1)"
rc=$?
set -e
if [ "$rc" -ne 0 ] \
   || ! grep -q "Creating group 'floodgate'" <<<"$out" \
   || ! grep -q "Creating user 'floodgate'" <<<"$out"; then
    printf '%s\n' "$out" >&2
    fail "systemd-sysusers --dry-run floodgate.sysusers (exit $rc)"
fi
[ -z "$(ls -A "$sroot")" ] || fail "systemd-sysusers --dry-run wrote into its root"
info "OK: systemd-sysusers --dry-run floodgate.sysusers"

# --- 4. the nightly backup example -------------------------------------------
# Its ExecStart= runs /bin/sh, date and find: give the throw-away root the host's.
for tool in sh date find; do
    cp "$(readlink -f "$(command -v "$tool")")" "$root/usr/bin/$tool"
done
for u in "${BACKUP_UNITS[@]}"; do
    cp "$here/$u" "$root/etc/systemd/system/$u"
done
if [ -n "$BIN" ]; then
    out="$(cd "$work" && timeout 20 "$BIN" ctl backup --help 2>&1)" \
        || fail "'$BIN ctl backup --help' failed: floodgate-backup.service runs it"
    grep -q -- '--failures' <<<"$out" || fail "'ctl backup' has no --failures option"
fi
set +e
out="$(systemd-analyze verify --man=no --root="$root" \
        /etc/systemd/system/floodgate-backup.service /etc/systemd/system/floodgate-backup.timer 2>&1)"
rc=$?
set -e
out="${out//$root/}"
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify floodgate-backup.service/.timer (exit $rc)"
fi
info "OK: systemd-analyze verify floodgate-backup.service floodgate-backup.timer"

info "all checks passed (exposure $score)"
