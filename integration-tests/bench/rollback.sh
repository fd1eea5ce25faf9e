#!/usr/bin/env bash
# Rollback time, the fast path against the batched rollback, in the same
# run: one release-built coordinator (1 s heartbeats) and N simulated agents
# (`agent-sim`, the real protocol over mTLS; each activation takes
# $CUTOVER_MS ms, default 500: a release's start, health gate and smoke
# checks). For each N in $NODES (default "3 50"), on a fresh data dir:
#   v1 is deployed with batch = "25%" and min_healthy_time = "10s" (what a
#   rollback to it follows when batched), v2 on top of it; then
#   `cutover rollback --wait` (the fast path) back to v1; then v3, and
#   `cutover rollback --careful --wait` back to v1 again.
# Reported per rollback: the time from its start to its last node switched
# (from its timeline) and to the command's return.
#
#   integration-tests/bench/rollback.sh
#   NODES="3 50 200" CUTOVER_MS=1000 integration-tests/bench/rollback.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
counts=${NODES:-"3 50"}
cutover_ms=${CUTOVER_MS:-500}
source integration-tests/bench/sim-lib.sh

sim_spec 'batch = "25%"
min_healthy_time = "10s"' >"$work/batched.toml"
sim_spec 'batch = "100%"
min_healthy_time = "0s"' >"$work/quick.toml"

deploy() {
  "$cutover" deploy --env sim --file "$work/$1.toml" --artifact "$work/app.tar.gz" --version "$2" --wait >/dev/null
}

# Times a rollback: "| how | batches | start to last switch | to the command's return |".
timed_rollback() {
  local how=$1; shift
  local t0 t1 id
  t0=$(date +%s%N)
  "$cutover" rollback web --env sim --wait "$@" >"$work/rollback.out" 2>&1 || { cat "$work/rollback.out" >&2; exit 1; }
  t1=$(date +%s%N)
  # The newest rollback (a convergence may have started since).
  grep -q "rollout web-" "$work/rollback.out" || { cat "$work/rollback.out" >&2; exit 1; }
  id=$("$cutover" rollout list -o json | python3 -c '
import json, sys
rollouts = json.load(sys.stdin)
print([r for r in rollouts if r["kind"] == "rollback"][0]["id"])')
  "$cutover" rollout status "$id" -o json | python3 -c '
import json, sys
from datetime import datetime
r = json.load(sys.stdin)
assert r["kind"] == "rollback" and r["state"] == "succeeded", r["state"]
t = r["timeline"]
ms = lambda e: round(datetime.fromisoformat(e["at"]).timestamp() * 1000)
start = [ms(e) for e in t if e["kind"] == "started"][0]
last = max(ms(e) for e in t if e["kind"] == "node_switched")
batches = len([e for e in t if e["kind"] == "batch_started"]) or "none"
wall = ('"$t1"' - '"$t0"') / 1e6
nodes = len(r["nodes"])
print(f"| {nodes} | '"$how"' | {batches} | {(last - start) / 1000:.2f} s | {wall / 1000:.2f} s |")
'
}

echo "| nodes | rollback | batches | start to last switch | command to return |"
echo "| --- | --- | --- | --- | --- |"
for count in $counts; do
  start_coordinator "$count" 'heartbeat_interval = "1s"'
  start_sim "$count" --cutover-ms "$cutover_ms"

  deploy batched v1
  deploy quick v2
  timed_rollback "fast (default)"
  deploy quick v3
  timed_rollback "batched (--careful)" --careful
  kill "$sim_pid" "$coordinator"
  wait "$sim_pid" "$coordinator" 2>/dev/null || true
done
