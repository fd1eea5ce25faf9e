#!/usr/bin/env bash
# Zero downtime, rollback speed and agent footprint on a release-built local
# cluster of 3 nodes (`cutover dev up`), with the demo app (examples/demo):
#
#  1. steady state: closed-loop load through the 3 node proxies for
#     STEADY_SECONDS (default 20): requests/s, p50/p99;
#  2. a rolling rollout v1 -> v2 (batches of one node, min_healthy_time 5 s)
#     under the same load: requests sent and failed, p50/p99 during it;
#  3. an automatic rollback: v3 passes its checks, then fails health after
#     3 s, under the same load: sent, failed, p99;
#  4. rollback speed: `cutover rollback web` from v2 back to v1 with every
#     artifact cached: time from the command to the last node switched (from
#     the rollout's own timeline) and to the command's return;
#  5. agent footprint: RSS and CPU of one agent serving a release, idle for
#     IDLE_SECONDS (default 30) and under the steady load.
#
#   integration-tests/bench/rollout.sh
#   CONNECTIONS=12 integration-tests/bench/rollout.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
steady=${STEADY_SECONDS:-20}
idle=${IDLE_SECONDS:-30}
connections=${CONNECTIONS:-8}

command -v python3 >/dev/null || apt-get install -y python3 >/dev/null
cargo build --release --locked -p cutover-agent -p cutover-coordinator -p cutover-integration-tests --bins
cutover=$PWD/target/release/cutover
loadgen=$PWD/target/release/loadgen
dir=$(mktemp -d)
trap '"$cutover" dev down --dir "$dir" >/dev/null 2>&1; rm -rf "$dir"' EXIT
"$cutover" dev up --nodes 3 --dir "$dir" >/dev/null
# shellcheck disable=SC1091
source "$dir/env"

for version in v1 v2 v3; do
  mkdir -p "$dir/art/$version"
  cp examples/demo/app.py "$dir/art/$version/"
  echo "$version" >"$dir/art/$version/VERSION"
done
echo 3 >"$dir/art/v3/BROKEN"
for version in v1 v2 v3; do tar -C "$dir/art/$version" -czf "$dir/art/$version.tar.gz" .; done
sed -e 's/min_healthy_time = "2s"/min_healthy_time = "5s"/' examples/demo/cutover.toml >"$dir/cutover.toml"
deploy() { "$cutover" deploy -f "$dir/cutover.toml" --env local --version "$1" --artifact "$dir/art/$1.tar.gz" --wait "${@:2}"; }

targets=()
for i in 11 12 13; do targets+=(--target "127.0.0.$i:18080"); done
load() { "$loadgen" "${targets[@]}" --connections "$connections" "$@" 2>>"$dir/load.log"; }
report() {
  python3 -c '
import json, sys
r = json.loads(sys.argv[2])
print("| %s | %d | %d | %.0f | %.2f ms | %.2f ms |" % (sys.argv[1], r["sent"], r["failed"], r["requests_per_second"], r["p50_ms"], r["p99_ms"]))
for f in r["failures"]:
    print("  failure:", f, file=sys.stderr)
' "$1" "$2"
}
# Runs "$@" while the load runs; prints the load's JSON.
under_load() {
  local out=$dir/load.json
    # The binary itself in the background (not the function, whose subshell
  # would take the signal instead).
  "$loadgen" "${targets[@]}" --connections "$connections" >"$out" 2>>"$dir/load.log" &
  local pid=$!
  sleep 1
  "$@" >/dev/null 2>&1 || true
  sleep 1
  kill -TERM "$pid"
  wait "$pid" || true
  cat "$out"
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss() { awk '/VmRSS/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
agent=$(cat "$dir/agent-1.pid")

deploy v1 >/dev/null 2>&1

echo "## Agent footprint, one release serving (idle ${idle} s, then ${steady} s of load)"
sleep 3
a0=$(ticks "$agent")
sleep "$idle"
a1=$(ticks "$agent")
idle_rss=$(rss "$agent")
echo
echo "| phase | sent | failed | requests/s | p50 | p99 |"
echo "| --- | --- | --- | --- | --- | --- |"
b0=$(ticks "$agent")
steady_json=$(load --duration "$steady")
b1=$(ticks "$agent")
load_rss=$(rss "$agent")
report "steady state (${steady} s)" "$steady_json"
rollout_json=$(under_load deploy v2)
report "rolling rollout v1 -> v2" "$rollout_json"
rollback_json=$(under_load deploy v3)
report "automatic rollback of v3" "$rollback_json"
v3_state=$("$cutover" --output json rollout list --limit 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["state"])')

started=$(date +%s%N)
"$cutover" rollback web --env local --wait >/dev/null 2>&1
returned=$(( ($(date +%s%N) - started) / 1000000 ))
switched=$("$cutover" --output json rollout list --limit 1 | python3 -c '
import json, sys, datetime
r = json.load(sys.stdin)[0]
t = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
last = max(t(e["at"]) for e in r["timeline"] if e["kind"] == "node_switched")
print("%d %s" % ((last - t(r["created_at"])) * 1000, r["state"]))')

echo
echo "v3 ended: $v3_state"
echo
echo "| rollback web v2 -> v1, 3 nodes, batch 1, min_healthy_time 5 s | ms |"
echo "| --- | --- |"
echo "| command to last node switched | ${switched% *} |"
echo "| command to return (--wait: includes the last batch's 5 s watch) | $returned |"
echo "rollback ended: ${switched#* }"
echo
echo "| agent with one release | RSS | CPU (share of one core) |"
echo "| --- | --- | --- |"
awk -v t=$((a1 - a0)) -v hz="$hz" -v s="$idle" -v r="$idle_rss" 'BEGIN { printf "| idle %d s | %s | %.3f%% |\n", s, r, 100 * t / hz / s }'
awk -v t=$((b1 - b0)) -v hz="$hz" -v s="$steady" -v r="$load_rss" 'BEGIN { printf "| proxying its share of the steady load, %d s | %s | %.1f%% |\n", s, r, 100 * t / hz / s }'
