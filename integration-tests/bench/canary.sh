#!/usr/bin/env bash
# Canary abort speed on a release-built local cluster of 2 nodes (`cutover
# dev up`) with the test app (agent/tests/fixtures/app.py):
#
#   v1 serves; v2 starts as a canary on both nodes at weight 50 and waits
#   for promotion; a prober sends requests as 200 distinct clients (their
#   address in X-Forwarded-For, no cookie) through both node proxies, about
#   half answered by v2; then `cutover rollout abort`. Measured: the time
#   from the abort command's start to the last answer from v2 (every
#   request on stable from then on), and to the command's return. ROUNDS
#   rounds (default 5), each round a `cutover rollout retry` of the aborted
#   canary.
#
#   integration-tests/bench/canary.sh
#   ROUNDS=10 integration-tests/bench/canary.sh
#
# Prints a markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-5}
port=47180

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
spec() { # version strategy
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
$2
[environments.local]
nodes = { env = "local" }
SPEC
}
deploy() { # version strategy -> exit code
  spec "$1" "$2"
  "$cutover" deploy -f "$dir/cutover-$1.toml" --env local --version "$1" --artifact "$dir/app.tar.gz" --wait >"$dir/deploy-$1.log" 2>&1 || {
    local code=$?
    [ "$code" = 3 ] || cat "$dir/deploy-$1.log" >&2
    return $code
  }
}
deploy v1 'batch = 2'
code=0
deploy v2 $'kind = "canary"\nsteps = [{ set_weight = 50 }, { pause = {} }]\nabort_scale_down_delay = "1s"' || code=$?
[ "$code" = 3 ] || { echo "the canary did not wait for promotion (exit $code)" >&2; exit 1; }

# Requests through both proxies until told to stop; prints the wall-clock
# time (ns) of the last answer from v2 and the counts.
cat >"$dir/probe.py" <<'PY'
import http.client, os, sys, time
port, stop_file = int(sys.argv[1]), sys.argv[2]
conns = [http.client.HTTPConnection("127.0.0.%d" % (11 + i), port, timeout=5) for i in range(2)]
last_canary, answers, canary, failed, i = 0, 0, 0, 0, 0
while not os.path.exists(stop_file):
    c = conns[i % 2]
    try:
        c.request("GET", "/", headers={"X-Forwarded-For": "10.9.%d.%d" % (i % 200 // 100, i % 100)})
        r = c.getresponse()
        body = r.read().decode()
        answers += 1
        if r.status != 200:
            failed += 1
        if body == "v2":
            canary += 1
            last_canary = time.time_ns()
    except OSError:
        failed += 1
        conns[i % 2] = http.client.HTTPConnection("127.0.0.%d" % (11 + i % 2), port, timeout=5)
    i += 1
print(last_canary, answers, canary, failed)
PY

# The newest deploy (not a convergence).
newest() { "$cutover" --output json rollout list | python3 -c 'import json,sys; r=[r for r in json.load(sys.stdin) if r["kind"]=="deploy"][0]; print(r["id"], r["state"])'; }
results=()
for round in $(seq "$rounds"); do
  read -r id state < <(newest)
  rm -f "$dir/stop"
  python3 "$dir/probe.py" "$port" "$dir/stop" >"$dir/probe.out" &
  probe=$!
  sleep 1
  asked=$(date +%s%N)
  "$cutover" rollout abort "$id" >/dev/null
  returned=$(date +%s%N)
  sleep 1
  touch "$dir/stop"
  wait "$probe"
  read -r last answers canary failed <"$dir/probe.out"
  stable_after=$(( (last - asked) / 1000000 ))
  echo "round $round: last v2 answer $stable_after ms after the abort started, command returned after $(( (returned - asked) / 1000000 )) ms; $answers answers, $canary from v2, $failed failed" >&2
  [ "$failed" = 0 ] || { echo "requests failed during the abort" >&2; exit 1; }
  results+=("$stable_after $(( (returned - asked) / 1000000 ))")
  # Back to a canary at 50 % for the next round.
  if [ "$round" -lt "$rounds" ]; then
    for _ in $(seq 100); do read -r id state < <(newest); [ "$state" = aborted ] && break; sleep 0.1; done
    "$cutover" rollout retry "$id" >/dev/null
    read -r id state < <(newest)
    code=0
    "$cutover" rollout watch "$id" >/dev/null 2>&1 || code=$?
    [ "$code" = 3 ] || { echo "the retried canary did not wait for promotion (exit $code)" >&2; exit 1; }
  fi
done

"$cutover" --output json rollout list | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    if r["kind"] == "converge":
        print("note: convergence %s (%s): %s" % (r["id"], r["state"], r["timeline"][0]["message"] if r.get("timeline") else ""), file=sys.stderr)'
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(int, l.split())) for l in sys.stdin if l.strip()]
stable = [r[0] for r in rows]; ret = [r[1] for r in rows]
print("| canary abort at weight 50, 2 nodes (%d rounds) | median | max |" % len(rows))
print("| --- | --- | --- |")
print("| abort command start to the last answer from the canary | %d ms | %d ms |" % (statistics.median(stable), max(stable)))
print("| abort command start to its return | %d ms | %d ms |" % (statistics.median(ret), max(ret)))'
