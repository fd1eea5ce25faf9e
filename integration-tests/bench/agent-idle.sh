#!/usr/bin/env bash
# Idle footprint of an agent: a release-built local cluster with one node,
# the agent's RSS and the CPU it uses over a minute of heartbeats (1 s in a
# dev cluster, 5 s by default in production, so this is the busier case).
#
#   integration-tests/bench/agent-idle.sh        # SECONDS_IDLE=60 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
idle=${SECONDS_IDLE:-60}
cargo build --release --locked -p cutover-agent -p cutover-coordinator --bins
dir=$(mktemp -d)
trap './target/release/cutover dev down --dir "$dir" >/dev/null; rm -rf "$dir"' EXIT
./target/release/cutover dev up --nodes 1 --dir "$dir" >/dev/null
agent=$(cat "$dir/agent-1.pid")
coordinator=$(cat "$dir/coordinator.pid")
sleep 5
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
a0=$(ticks "$agent"); c0=$(ticks "$coordinator")
sleep "$idle"
a1=$(ticks "$agent"); c1=$(ticks "$coordinator")
rss() { awk '/VmRSS/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status"; }
awk -v a=$((a1 - a0)) -v c=$((c1 - c0)) -v hz="$hz" -v s="$idle" \
  -v ar="$(rss "$agent")" -v cr="$(rss "$coordinator")" 'BEGIN {
  printf "| process | RSS | CPU (share of one core over %d s) |\n| --- | --- | --- |\n", s
  printf "| agent, no service | %s | %.3f%% |\n", ar, 100 * a / hz / s
  printf "| coordinator, one node | %s | %.3f%% |\n", cr, 100 * c / hz / s
}'
