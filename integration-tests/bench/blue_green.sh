#!/usr/bin/env bash
# Blue/green rollback speed on a release-built local cluster of 2 nodes
# (`cutover dev up`) with the test app (agent/tests/fixtures/app.py):
#
#   v1 serves; each round deploys a new version as blue/green with
#   keep_warm = 1 (both nodes start it beside the serving one), promotes
#   it (both switch, the old release stays running without traffic), then
#   runs `cutover rollback web --env local --wait` while a prober sends
#   requests through both node proxies. Measured: the time from the
#   rollback command's start to the last answer from the version rolled
#   back from (every request on the warm release from then on), the
#   command's return (its rollout with prepare and min_healthy_time), and
#   the per-node switch from the rollout's timeline (batch start to the
#   node switched). ROUNDS rounds (default 5).
#
#   integration-tests/bench/blue_green.sh
#
# Prints a markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-5}
port=47190

command -v python3 >/dev/null || apt-get install -y python3 >/dev/null
cargo build --release --locked -p cutover-agent -p cutover-coordinator --bins
cutover=$PWD/target/release/cutover
dir=$(mktemp -d)
trap '"$cutover" dev down --dir "$dir" >/dev/null 2>&1; rm -rf "$dir"' EXIT
"$cutover" dev up --nodes 2 --dir "$dir" >/dev/null
# shellcheck disable=SC1091
source "$dir/env"

mkdir -p "$dir/art"
cp agent/tests/fixtures/app.py "$dir/art/"
tar -C "$dir/art" -czf "$dir/app.tar.gz" app.py
deploy() { # version -> exit code
  cat >"$dir/cutover-$1.toml" <<SPEC
app = "bench"
[services.web]
command = ["python3", "app.py"]
listen = ":$port"
[services.web.env]
VERSION = "$1"
[services.web.health]
path = "/health"
interval = "100ms"
[strategy]
kind = "blue_green"
keep_warm = 1
min_healthy_time = "1s"
[environments.local]
nodes = { env = "local" }
SPEC
  "$cutover" deploy -f "$dir/cutover-$1.toml" --env local --version "$1" --artifact "$dir/app.tar.gz" --wait >"$dir/deploy-$1.log" 2>&1 || {
    local code=$?
    [ "$code" = 3 ] || cat "$dir/deploy-$1.log" >&2
    return $code
  }
}
newest() { "$cutover" --output json rollout list | python3 -c 'import json,sys; r=[r for r in json.load(sys.stdin) if r["kind"]!="converge"][0]; print(r["id"], r["state"])'; }
deploy v1

# Requests through both proxies until told to stop; prints the wall-clock
# time (ns) of the last answer from version argv[3], and the counts.
cat >"$dir/probe.py" <<'PY'
import http.client, os, sys, time
port, stop_file, leaving = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conns = [http.client.HTTPConnection("127.0.0.%d" % (11 + i), port, timeout=5) for i in range(2)]
last, answers, failed, i = 0, 0, 0, 0
while not os.path.exists(stop_file):
    c = conns[i % 2]
    try:
        c.request("GET", "/")
        r = c.getresponse()
        body = r.read().decode()
        answers += 1
        if r.status != 200:
            failed += 1
        if body == leaving:
            last = time.time_ns()
    except OSError:
        failed += 1
        conns[i % 2] = http.client.HTTPConnection("127.0.0.%d" % (11 + i % 2), port, timeout=5)
    i += 1
print(last, answers, failed)
PY

results=()
for round in $(seq "$rounds"); do
  version="v$((round + 1))"
  code=0
  deploy "$version" || code=$?
  [ "$code" = 3 ] || { echo "$version did not wait for promotion (exit $code)" >&2; exit 1; }
  read -r id state < <(newest)
  "$cutover" rollout promote "$id" >/dev/null
  "$cutover" rollout watch "$id" >/dev/null
  rm -f "$dir/stop"
  python3 "$dir/probe.py" "$port" "$dir/stop" "$version" >"$dir/probe.out" &
  probe=$!
  sleep 1
  asked=$(date +%s%N)
  "$cutover" rollback web --env local --wait >/dev/null
  returned=$(date +%s%N)
  sleep 0.5
  touch "$dir/stop"
  wait "$probe"
  read -r last answers failed <"$dir/probe.out"
  read -r back state < <(newest)
  switch=$("$cutover" --output json rollout status "$back" | python3 -c '
import json, sys
from datetime import datetime
r = json.load(sys.stdin)
at = lambda t: datetime.fromisoformat(t["at"].replace("Z", "+00:00")).timestamp() * 1000
start = at([t for t in r["timeline"] if t["kind"] == "batch_started"][0])
print(max(int(at(t) - start) for t in r["timeline"] if t["kind"] == "node_switched"))')
  back_after=$(( (last - asked) / 1000000 ))
  echo "round $round: last $version answer $back_after ms after the rollback started, command returned after $(( (returned - asked) / 1000000 )) ms, slowest node switched $switch ms after its batch started; $answers answers, $failed failed" >&2
  [ "$failed" = 0 ] || { echo "requests failed during the rollback" >&2; exit 1; }
  results+=("$back_after $(( (returned - asked) / 1000000 )) $switch")
done

printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(int, l.split())) for l in sys.stdin if l.strip()]
col = lambda i: [r[i] for r in rows]
print("| blue/green rollback to the warm release, 2 nodes (%d rounds) | median | max |" % len(rows))
print("| --- | --- | --- |")
print("| rollback command start to the last answer from the release rolled back from | %d ms | %d ms |" % (statistics.median(col(0)), max(col(0))))
print("| batch start to the slowest node switched (rollout timeline) | %d ms | %d ms |" % (statistics.median(col(2)), max(col(2))))
print("| rollback command start to its return (`--wait`: prepare, switch, min_healthy_time 1 s) | %d ms | %d ms |" % (statistics.median(col(1)), max(col(1))))'
