#!/usr/bin/env bash
# Control-plane scale: one release-built coordinator (`cutover server`, its
# default 5 s heartbeats) and N simulated agents (`agent-sim`: one process,
# one mTLS connection and certificate per agent, the real protocol, every
# command answered at once). For each N in $AGENTS (default "1000 5000
# 10000"), on a fresh data dir:
#   - the coordinator's RSS and CPU (share of one core) over $WINDOW seconds
#     (default 30) of steady heartbeats, and heartbeats handled per second
#     (its own counter);
#   - at the first N (1000 by default): a rolling rollout over every node in
#     10% batches with min_healthy_time 0, so each batch takes only what the
#     coordinator needs to command it and take the answers: wall time per
#     batch from the rollout's timeline, and the coordinator's CPU time for
#     the whole rollout divided by the batches.
#
#   integration-tests/bench/control-plane.sh
#   AGENTS="1000 10000" WINDOW=20 integration-tests/bench/control-plane.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
counts=${AGENTS:-"1000 5000 10000"}
window=${WINDOW:-30}
source integration-tests/bench/sim-lib.sh

first_count=${counts%% *}
echo "| agents | coordinator RSS | coordinator CPU (one core) | heartbeats/s | connect time |"
echo "| --- | --- | --- | --- | --- |"
rollout_table=""
for count in $counts; do
  start_coordinator "$count" "[limits]
agent_queue = 64"
  start=$(date +%s.%N)
  start_sim "$count" --connect-rate 1000
  connected=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f s", e - s }')
  sleep 10
  beats() { curl -sf "http://127.0.0.1:$http/metrics" | awk '/^cutover_heartbeats_total / { print $2 }'; }
  t0=$(ticks "$coordinator"); b0=$(beats)
  sleep "$window"
  t1=$(ticks "$coordinator"); b1=$(beats)
  awk -v n="$count" -v r="$(rss_mib "$coordinator")" -v c=$((t1 - t0)) -v hz="$hz" -v w="$window" \
    -v b=$((b1 - b0)) -v ct="$connected" \
    'BEGIN { printf "| %d | %d MiB | %.1f%% | %.0f | %s |\n", n, r, 100 * c / hz / w, b / w, ct }'

  if [ "$count" = "$first_count" ]; then
    sim_spec 'batch = "10%"
min_healthy_time = "0s"' >"$work/cutover.toml"
    r0=$(ticks "$coordinator")
    "$cutover" deploy --env sim --file "$work/cutover.toml" --artifact "$work/app.tar.gz" --version v1 --wait >/dev/null
    r1=$(ticks "$coordinator")
    id=$("$cutover" rollout list -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
    rollout_table=$(rollout_report "$id" $((r1 - r0)))
  fi
  kill "$sim_pid" "$coordinator"
  wait "$sim_pid" "$coordinator" 2>/dev/null || true
done
echo
echo "$rollout_table"
