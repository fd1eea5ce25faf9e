# Shared by the benchmarks that run one release-built coordinator against
# simulated agents (control-plane.sh, rollback.sh); sourced from the
# repository root. Builds the binaries, makes a work dir (removed, with
# every process started, on exit), a PKI with an operator certificate in
# the environment, and the artifact deploys name (simulated agents never
# fetch it, but a deploy pins its digest).

# Each agent is a connection in both processes: as many descriptors as
# allowed (10,000 agents need a little over 10,000 in each).
ulimit -n "$(ulimit -Hn)"

cargo build --release --locked -p cutover-coordinator -p cutover-integration-tests --bins >&2
cutover=$PWD/target/release/cutover
sim=$PWD/target/release/agent-sim
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A process's CPU time in clock ticks ($hz a second), and its RSS.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_mib() { awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$cutover" ca init --dir "$work/pki" >/dev/null
"$cutover" ca issue operator --name bench --dir "$work/pki" >/dev/null
export CUTOVER_CA_CERT=$work/pki/ca.crt CUTOVER_CERT=$work/pki/operator-bench.crt CUTOVER_KEY=$work/pki/operator-bench.key

mkdir -p "$work/app" && echo 'print("sim")' >"$work/app/app.py"
tar -czf "$work/app.tar.gz" -C "$work/app" app.py

# sim_spec STRATEGY: the spec of the benchmarks' one service, web, on every
# simulated node (env = "sim"), with STRATEGY in its [strategy] table.
sim_spec() {
  cat <<TOML
app = "sim"
[services.web]
command = ["python3", "app.py"]
listen = ":8080"
[services.web.health]
path = "/health"
[strategy]
$1
prepare_parallelism = 100
[environments.sim]
nodes = { env = "sim" }
TOML
}

# start_coordinator NAME [TOML]: a coordinator on a fresh data dir
# $work/data-NAME, TOML added to its top-level settings; sets $coordinator
# (its pid), $http (its HTTP port) and CUTOVER_COORDINATOR, and returns once
# it answers /healthz.
start_coordinator() {
  local grpc
  grpc=$(free_port); http=$(free_port)
  cat >"$work/coordinator-$1.toml" <<TOML
data_dir = "$work/data-$1"
listen = "127.0.0.1:$grpc"
http_listen = "127.0.0.1:$http"
ca_key = "$work/pki/ca.key"
${2:-}
[tls]
ca_cert = "$work/pki/ca.crt"
cert = "$work/pki/coordinator.crt"
key = "$work/pki/coordinator.key"
TOML
  "$cutover" server --config "$work/coordinator-$1.toml" >"$work/coordinator-$1.log" 2>&1 &
  coordinator=$!
  pids+=("$coordinator")
  export CUTOVER_COORDINATOR=https://127.0.0.1:$grpc
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http/healthz" >/dev/null && return; sleep 0.1; done
  echo "the coordinator did not start: $work/coordinator-$1.log" >&2
  return 1
}

# start_sim COUNT [AGENT-SIM FLAGS...]: COUNT simulated agents against the
# coordinator; sets $sim_pid and returns once every one is connected.
start_sim() {
  local count=$1 line
  shift
  coproc SIM { exec "$sim" --coordinator "$CUTOVER_COORDINATOR" --pki "$work/pki" --agents "$count" "$@" 2>"$work/sim-$count.log"; }
  sim_pid=$SIM_PID
  pids+=("$sim_pid")
  read -r line <&"${SIM[0]}"
  [ "$line" = "connected $count" ] || { echo "simulator: $line" >&2; return 1; }
}

# rollout_report ID CPU_TICKS: the table of rollout ID's batches from its own
# timeline (prepare, per batch mean and max, whole rollout) and the
# coordinator's CPU per batch, CPU_TICKS being its CPU time over the
# rollout in clock ticks.
rollout_report() {
  "$cutover" rollout status "$1" -o json | python3 -c '
import json, sys
from datetime import datetime
r = json.load(sys.stdin)
t = r["timeline"]
ms = lambda text: round(datetime.fromisoformat(text).timestamp() * 1000)
at = lambda e: ms(e["at"])
starts = [at(e) for e in t if e["kind"] == "batch_started"]
end = [at(e) for e in t if e["kind"] == "succeeded"][0]
created = ms(r["created_at"])
prepared = [at(e) for e in t if e["kind"] == "prepared"][0]
bounds = starts + [end]
per = [b - a for a, b in zip(bounds, bounds[1:])]
cpu_ms = int(sys.argv[1]) * 1000 / int(sys.argv[2])
print(f"| nodes | batches | prepare (all nodes) | per batch, mean | per batch, max | whole rollout | coordinator CPU per batch |")
print(f"| --- | --- | --- | --- | --- | --- | --- |")
nodes = len(r["nodes"])
print(f"| {nodes} | {len(per)} | {prepared - created} ms | {sum(per) / len(per):.0f} ms | {max(per)} ms | {end - created} ms | {cpu_ms / len(per):.0f} ms |")
' "$2" "$hz"
}
