#!/usr/bin/env bash
# bench/incident.sh: replay of the 2024-11-05 incident against Floodgate, on loopback.
#
# Eight campaigns of 1,000,000 recipients each (x --scale) at empty, malformed, NXDOMAIN
# addresses and at a domain whose MX answers 550, injected as fast as the machine allows,
# while one campaign sends valid mail at a steady rate. Two passes in one run, each on a
# fresh Floodgate: the valid campaign alone (baseline), then with the flood. The load
# generator is examples/loadgen.rs; it is also the receiving SMTP server (the MX of both
# the valid and the 550 domain) and it polls the admin API.
#
# Reports valid mail's accept-to-delivery latency (250 after DATA -> whole message at the
# sink) with and without the flood, failures absorbed per second, failure-log transactions
# per second, failures.db's size, Floodgate's peak RSS, seconds until the guard paused each
# flood campaign, and the counts that show nothing was lost or miscounted.
#
# --batch-flood: the same incident through the batch door (issue #15): the flood pass
# sends valid mail as before and, at once, eight POST /v1/batches each streaming
# 1,000,000 x --scale invalid rows (empty, malformed, NXDOMAIN) in one request; it
# reports valid p99 with vs without, failure-log transactions per second, the uploads'
# rows per second and each batch's exact counts. Give --duration longer than the uploads
# so valid mail flows through all of them.
#
# A benchmark, not a test. Root only (it installs packages). Talks to 127.0.0.1 only.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/incident.sh [options]

      --scale F        recipients per flood campaign = 1,000,000 x F  (env SCALE, default 0.1)
      --valid-rate R   valid messages per second                   (env VALID_RATE, default 50)
      --duration S     baseline length; the flood pass's valid mail runs at least this long
                                                                   (env DURATION, default 30)
      --sessions N     SMTP sessions per flood campaign             (env SESSIONS, default 2)
      --flood-rate R   flood recipients per second, all campaigns; 0 = as fast as the
                       machine allows                             (env FLOOD_RATE, default 0)
      --http-campaigns N  NXDOMAIN flood campaigns posted to /v1/messages instead of SMTP
                                                                   (env HTTP_CAMPAIGNS, default 0)
      --batch-flood    the flood as 8 batch uploads of invalid rows instead of campaigns
      --no-baseline    only the flood pass
      --pin            Floodgate on CPU 0 and the load generator on CPU 1 (taskset), in
                       both passes: isolation measured without the generator stealing
                       Floodgate's cycles                          (env PIN=1)
      --no-build       do not build first
      --keep           keep the temporary directory
      --idle-wait S    wait up to S s for an idle machine before each pass (default 120)
  -h, --help           this text
EOF
}

SCALE=${SCALE:-0.1}
VALID_RATE=${VALID_RATE:-50}
DURATION=${DURATION:-30}
SESSIONS=${SESSIONS:-2}
FLOOD_RATE=${FLOOD_RATE:-0}
HTTP_CAMPAIGNS=${HTTP_CAMPAIGNS:-0}
IDLE_WAIT=${IDLE_WAIT:-120}
PIN=${PIN:-0}
BASELINE=1
BATCH_FLOOD=0
BUILD=1
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --scale) SCALE=$2; shift 2 ;;
        --valid-rate) VALID_RATE=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        --flood-rate) FLOOD_RATE=$2; shift 2 ;;
        --http-campaigns) HTTP_CAMPAIGNS=$2; shift 2 ;;
        --no-baseline) BASELINE=0; shift ;;
        --batch-flood) BATCH_FLOOD=1; shift ;;
        --pin) PIN=1; shift ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --idle-wait) IDLE_WAIT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "incident.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $FLOOD_RATE =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "incident.sh: --flood-rate must be a number" >&2; exit 2; }
[[ $SCALE =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "incident.sh: --scale must be a number" >&2; exit 2; }
for v in DURATION SESSIONS HTTP_CAMPAIGNS IDLE_WAIT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "incident.sh: $v must be a whole number" >&2; exit 2; }
done

NAME=incident
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
install_prereqs
if [[ $BUILD -eq 1 ]]; then
    build_release
    log "cargo build --release --example loadgen"
    (cd "$REPO" && cargo build --release --quiet --example loadgen)
fi
FLOODGATE=$REPO/target/release/floodgate
LOADGEN=$REPO/target/release/examples/loadgen
LG_PIN=(env)    # a no-op wrapper, or taskset for the load generator's CPU
if [[ $PIN -eq 1 ]]; then
    command -v taskset >/dev/null || die "--pin needs taskset (util-linux)"
    [[ $NPROC -ge 2 ]] || die "--pin needs two CPUs"
    LG_PIN=(taskset -c 1)
    log "pinned: floodgate on CPU 0, loadgen on CPU 1"
fi
[[ -x $FLOODGATE && -x $LOADGEN ]] || die "build first (floodgate and examples/loadgen)"

log "machine: $NPROC x $CPU_MODEL; 4 KiB O_DSYNC write: $(dsync_ms) ms"

# ok.test and bounce.test have MX records pointing at 127.0.0.1 (the loadgen's sink);
# every other *.test name is NXDOMAIN (dnsmasq is authoritative for test., never forwards).
start_dnsmasq --mx-host=ok.test,mx.ok.test,10 --address=/mx.ok.test/127.0.0.1 \
    --mx-host=bounce.test,mx.bounce.test,10 --address=/mx.bounce.test/127.0.0.1

read -r API_KEY API_HASH < <("$FLOODGATE" gen-key 2>/dev/null | awk '/^key:/ { k = $2 } /^key_sha256/ { gsub(/"/, "", $3); h = $3 } END { print k, h }')
ADMIN_TOKEN=bench-admin-token-0123456789

# start_batch_flood HTTP_PORT DIR: eight batches, each streaming $TMP/invalid.ndjson in
# one request, in the background; sets BATCH_PIDS.
start_batch_flood() {
    local http=$1 dir=$2 i id
    BATCH_PIDS=()
    for i in 1 2 3 4 5 6 7 8; do
        id=$(curl -sf -H "Authorization: Bearer $API_KEY" \
            -d "{\"from\":\"news@shop.test\",\"campaign\":\"flood-batch-$i\",\"subject\":\"Hi {{ name }}\",\"text\":\"x\"}" \
            "http://127.0.0.1:$http/v1/batches" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        # The uploads are load generators too: on loadgen's CPU with --pin, and niced so
        # that they do not delay loadgen's own clock and sink (which would add their
        # wait to the valid mail's measured latency).
        "${LG_PIN[@]}" nice -n 10 curl -sf -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/x-ndjson" \
            -T "$TMP/invalid.ndjson" -X POST -o "$dir/batch-$i.json" \
            -w '%{time_total}\n' "http://127.0.0.1:$http/v1/batches/$id/recipients" \
            >"$dir/batch-$i.time" &
        BATCH_PIDS+=("$!")
        PIDS+=("$!")
    done
}

run_pass() {    # run_pass NAME FLOOD(true|false|batches)
    local name=$1 flood=$2 dir=$TMP/$1 rc=0 lg_pid lg_flood=$2
    [[ $flood == batches ]] && lg_flood=false
    mkdir -p "$dir/queue"
    free_port; local smtp=$PORT
    free_port; local http=$PORT
    free_port; local admin=$PORT
    free_port; local sink=$PORT
    cat >"$dir/floodgate.toml" <<EOF
[server]
hostname = "bench.floodgate"

[smtp]
listen = ["127.0.0.1:$smtp"]
max_connections = 1000
max_connections_per_ip = 1000

[http]
listen = "127.0.0.1:$http"

[[http.api_keys]]
name = "bench"
key_sha256 = "$API_HASH"

[admin]
listen = "127.0.0.1:$admin"
token = "$ADMIN_TOKEN"

[queue]
dir = "$dir/queue"
synchronous = "full"

[dns]
nameservers = ["127.0.0.1:$DNS_PORT"]

[delivery]
enabled = true

$(sink_route "$sink")
EOF
    serve_floodgate "$dir" "$smtp"
    [[ $PIN -eq 1 ]] && taskset -a -p -c 0 "$FG_PID" >/dev/null
    sync
    wait_idle "$name"
    local c0 c1 f0 f1
    c0=$(cpu_sample); f0=$(proc_cpu "$FG_PID")
    log "$name: loadgen --flood $flood --scale $SCALE --valid-rate $VALID_RATE --duration $DURATION (floodgate pid $FG_PID)"
    "${LG_PIN[@]}" "$LOADGEN" --smtp "127.0.0.1:$smtp" --http "127.0.0.1:$http" --api-key "$API_KEY" \
        --admin "127.0.0.1:$admin" --admin-token "$ADMIN_TOKEN" --sink "127.0.0.1:$sink" \
        --flood "$lg_flood" --scale "$SCALE" --valid-rate "$VALID_RATE" --duration "$DURATION" \
        --sessions-per-campaign "$SESSIONS" --http-campaigns "$HTTP_CAMPAIGNS" --flood-rate "$FLOOD_RATE" \
        --pid "$FG_PID" --max-seconds 3000 >"$dir/loadgen.json" 2>"$dir/loadgen.err" &
    lg_pid=$!
    PIDS+=("$lg_pid")
    if [[ $flood == batches ]]; then
        sleep 2    # valid mail flowing first
        start_batch_flood "$http" "$dir"
    fi
    wait "$lg_pid" || rc=$?
    forget_pid "$lg_pid"
    if [[ $flood == batches ]]; then
        local p
        for p in "${BATCH_PIDS[@]}"; do wait "$p" || die "a batch upload failed"; forget_pid "$p"; done
        # One answer per file, each without a trailing newline: read them one by one.
        python3 -c '
import json, sys
rows = [json.load(open(p)) for p in sys.argv[1:]]
print(json.dumps({"batches": [{k: r[k] for k in ("batch", "state", "received", "accepted", "rejected")} for r in rows]}))' "$dir"/batch-?.json >"$dir/batches.json"
        cat "$dir"/batch-?.time | paste -sd' ' >"$dir/batches.times"
    fi
    c1=$(cpu_sample); f1=$(proc_cpu "$FG_PID")
    [[ $rc -eq 0 ]] || { tail -n 20 "$dir/loadgen.err" >&2; die "loadgen failed (exit $rc)"; }
    if [[ -s $dir/loadgen.err ]]; then log "$name: loadgen said:"; head -n 20 "$dir/loadgen.err" >&2; fi
    local hwm
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$FG_PID/status")
    # SIGTERM: the failure-log writer flushes its last aggregates before exit.
    stop_pid "$FG_PID"
    local fdb=$dir/queue/failures.db
    local stats_sum stats_by events_rows fsize qdel qsched qfail
    stats_sum=$(sqlite3 "$fdb" "SELECT COALESCE(SUM(count), 0) FROM failure_stats WHERE reason != 'deferred'")
    stats_by=$(sqlite3 -separator '=' "$fdb" "SELECT reason, SUM(count) FROM failure_stats GROUP BY reason ORDER BY 2 DESC" | paste -sd' ')
    events_rows=$(sqlite3 "$fdb" "SELECT COUNT(*) FROM failures")
    fsize=$(cat "$fdb" "$fdb-wal" 2>/dev/null | wc -c || true)
    read -r qdel qsched qfail < <(sqlite3 -separator ' ' "$dir/queue/queue.db" \
        "SELECT SUM(state = 1), SUM(state = 0), SUM(state = 2) FROM recipients")
    python3 - "$dir/loadgen.json" "$name" "$hwm" "$stats_sum" "$stats_by" "$events_rows" "$fsize" \
        "${qdel:-0}" "${qsched:-0}" "${qfail:-0}" "$c0" "$c1" "$f0" "$f1" "$HZ" "$NPROC" "$dir" >>"$TMP/results.jsonl" <<'EOF'
import json, os, sys
(path, name, hwm, stats_sum, stats_by, events_rows, fsize, qdel, qsched, qfail,
 c0, c1, f0, f1, hz, ncpu, d) = sys.argv[1:]
r = json.load(open(path))
if os.path.exists(f"{d}/batches.json"):
    r.update(json.load(open(f"{d}/batches.json")))
    r["batch_seconds"] = [float(t) for t in open(f"{d}/batches.times").read().split()]
a, b = [list(map(int, s.split())) for s in (c0, c1)]
secs = r["run_seconds"]
tot = max(b[2] - a[2], 1)
r.update(name=name, vm_hwm_kb_end=int(hwm or 0), stats_sum=int(stats_sum), stats_by=stats_by,
         event_rows=int(events_rows), failures_db_bytes=int(fsize or 0),
         queue={"delivered": int(qdel), "scheduled": int(qsched), "failed": int(qfail)},
         machine_busy_pct=100 * (b[0] - a[0]) / tot,
         floodgate_cpu_pct=100 * (int(f1) - int(f0)) / int(hz) / secs)
print(json.dumps(r))
EOF
    log "$name: done in $(python3 -c 'import json,sys; print(round(json.loads(open(sys.argv[1]).read().splitlines()[-1])["run_seconds"], 1))' "$TMP/results.jsonl") s"
}

: >"$TMP/results.jsonl"
if [[ $BATCH_FLOOD -eq 1 ]]; then
    PER_BATCH=$(awk -v s="$SCALE" 'BEGIN { printf "%d", 1000000 * s }')
    python3 "$REPO/bench/batchgen.py" invalid "$PER_BATCH" >"$TMP/invalid.ndjson"
    if [[ $BASELINE -eq 1 ]]; then run_pass baseline false; fi
    run_pass batches batches
    python3 - "$TMP/results.jsonl" "$NPROC" "$CPU_MODEL" "$PER_BATCH" <<'EOF'
import json, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["name"]: r for r in rows}
f = by["batches"]; b = by.get("baseline"); per = int(sys.argv[4])
def ms(x): return "-" if x is None or x != x else f"{x:.0f}"
print()
print(f"Incident through the batch door: 8 batches x {per:,} invalid rows, one request each, "
      f"valid mail at {f['valid']['rate_achieved']:.1f} msg/s; {sys.argv[2]} x {sys.argv[3]}, {datetime.date.today()}")
print()
print("| pass | run s | valid sent | valid received | p50 ms | p90 ms | p99 ms | max ms | CPU busy | floodgate CPU |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    v = r["valid"]; l = v["latency_ms"]
    print(f"| {r['name']} | {r['run_seconds']:.1f} | {v['sent_acked']} | {v['received']} | {ms(l['p50'])} | {ms(l['p90'])} | {ms(l['p99'])} | {ms(l['max'])} | {r['machine_busy_pct']:.0f}% | {r['floodgate_cpu_pct']:.0f}% |")
print()
if b:
    ratio = f["valid"]["latency_ms"]["p99"] / max(b["valid"]["latency_ms"]["p99"], 1e-9)
    print(f"valid p99 with the batch flood / without: {ratio:.2f}")
secs = f["batch_seconds"]
print(f"uploads: {8 * per:,} rows in {max(secs):.1f} s (slowest of 8) = {8 * per / max(secs):,.0f} rows/s together")
tx = f["faillog_transactions"]
print(f"failure-log transactions/s: avg {tx['per_second_avg']:.2f}, peak {tx['per_second_peak']:.2f} (total {tx['total']:.0f})")
print(f"failures.db: {f['failures_db_bytes'] / 1e6:.2f} MB ({f['event_rows']:,} event rows)")
exact = all(x["received"] == per and x["accepted"] == 0 and sum(x["rejected"].values()) == per for x in f["batches"])
print(f"counts exact (each batch received {per:,}, accepted 0, rejected {per:,}): {'yes' if exact else 'NO'}")
for x in f["batches"]:
    print(f"  {x['batch']} {x['state']}: received {x['received']:,} rejected {x['rejected']}")
v = f["valid"]
print(f"valid acknowledged {v['sent_acked']} == received {v['received_of_acked']} (duplicates {v['duplicates']}): {'yes' if v['sent_acked'] == v['received_of_acked'] and v['duplicates'] == 0 else 'NO'}")
EOF
    exit 0
fi
if [[ $BASELINE -eq 1 ]]; then run_pass baseline false; fi
run_pass flood true

python3 - "$TMP/results.jsonl" "$NPROC" "$CPU_MODEL" <<'EOF'
import json, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["name"]: r for r in rows}
f = by["flood"]; b = by.get("baseline")
def ms(x): return "-" if x is None or x != x else f"{x:.0f}"
print()
print(f"Incident replay: {len(f['campaigns'])} flood campaigns x {f['per_campaign']:,} recipients "
      f"(scale {f['scale']}), valid mail at {f['valid']['rate_achieved']:.1f} msg/s; "
      f"{sys.argv[2]} x {sys.argv[3]}, {datetime.date.today()}")
print()
print("| pass     | run s | valid sent | valid received | p50 ms | p90 ms | p99 ms | max ms | submit p99 ms | CPU busy | floodgate CPU |")
print("|----------|------:|-----------:|---------------:|-------:|-------:|-------:|-------:|--------------:|---------:|--------------:|")
for r in rows:
    v = r["valid"]; l = v["latency_ms"]
    print(f"| {r['name']:8} | {r['run_seconds']:5.1f} | {v['sent_acked']:10} | {v['received']:14} | {ms(l['p50']):>6} | {ms(l['p90']):>6} | {ms(l['p99']):>6} | {ms(l['max']):>6} | {ms(v['submit_ms']['p99']):>13} | {r['machine_busy_pct']:7.0f}% | {r['floodgate_cpu_pct']:12.0f}% |")
print()
ok = lambda c: "met" if c else "MISSED"
if b:
    ratio = f["valid"]["latency_ms"]["p99"] / max(b["valid"]["latency_ms"]["p99"], 1e-9)
    print(f"valid p99 with flood / without:        {ratio:6.2f}     (target <= 1.5: {ok(ratio <= 1.5)})")
tx = f["faillog_transactions"]
print(f"flood injected:                         {f['flood_injected']:,} recipients in {f['flood_seconds']:.1f} s = {f['flood_recipients_per_second']:,.0f}/s")
absorbed = f["floodgate_failures_sum"]
print(f"failures absorbed:                      {absorbed:,.0f} in {f['run_seconds']:.1f} s = {absorbed / f['run_seconds']:,.0f}/s (during injection: {f['client_refused'] / max(f['flood_seconds'], 1e-9):,.0f}/s refused to clients)")
print(f"failure-log transactions/s:             avg {tx['per_second_avg']:.2f}, peak {tx['per_second_peak']:.2f} (total {tx['total']:.0f})   (target <= 10: {ok(tx['per_second_peak'] <= 10)})")
print(f"failures.db size:                       {f['failures_db_bytes'] / 1e6:.2f} MB ({f['event_rows']:,} event rows)")
hwm = max(f.get('vm_hwm_kb') or 0, f.get('vm_hwm_kb_end') or 0)
print(f"floodgate peak RSS (VmHWM):             {hwm / 1024:.1f} MiB   (target <= 200 MB: {ok(hwm * 1024 <= 200e6)})" + (f"; baseline {max(b.get('vm_hwm_kb') or 0, b.get('vm_hwm_kb_end') or 0) / 1024:.1f} MiB" if b else ""))
print()
print("| campaign | kind | via | injected | refused to client | accepted | codes | injection s | s to paused |")
print("|---|---|---|---:|---:|---:|---|---:|---:|")
for c in f["campaigns"]:
    codes = ", ".join(f"{k}: {v:,}" for k, v in c["codes"].items())
    p = c["seconds_to_paused"]
    print(f"| {c['campaign']} | {c['kind']} | {c['via']} | {c['injected']:,} | {c['refused']:,} | {c['accepted']:,} | {codes} | {c['injection_seconds']:.1f} | {'-' if p is None else f'{p:.1f}'} |")
print()
print("Counts (flood pass):")
v = f["valid"]
print(f"  valid acknowledged {v['sent_acked']} == received at the sink {v['received_of_acked']} (duplicates {v['duplicates']}, errors {v['errors']}): {ok(v['sent_acked'] == v['received_of_acked'] and v['duplicates'] == 0)}")
fd = {k: int(x) for k, x in f["floodgate_failures_delta"].items()}
counted = sum(x for k, x in fd.items() if 'deferred' not in k)
expected = f["client_refused"] + f["sink_refused_550"]
print(f"  Floodgate counted (floodgate_failures_total, not deferred): {counted:,}  {fd}")
print(f"  failures.db failure_stats SUM(count), reason != 'deferred': {f['stats_sum']:,}  ({f['stats_by']})")
print(f"  refused to clients {f['client_refused']:,} + refused by the 550 MX {f['sink_refused_550']:,} = {expected:,}")
print(f"  all three equal: {ok(counted == f['stats_sum'] == expected)}")
q = f["queue"]
print(f"  queue.db recipients: delivered {q['delivered']:,}, scheduled (held) {q['scheduled']:,}, failed {q['failed']:,}")
EOF
