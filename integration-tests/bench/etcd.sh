#!/usr/bin/env bash
# Coordinators on etcd (a 3-member etcd 3.4 cluster with mutual TLS on
# loopback, started by scripts/etcd-env.sh), against simulated agents
# (`agent-sim`, the real protocol, every command answered at once):
#
#  1. the 1,000-node rolling rollout of control-plane.sh (10% batches,
#     min_healthy_time 0) on the embedded store and on etcd, in the same
#     run: per batch wall time from the rollout's timeline, and the
#     coordinator's CPU per batch;
#  2. three coordinators on one etcd prefix and $AGENTS (default 10000)
#     simulated agents listing all three: time until every agent is
#     connected (to the leader), then the leader's and a follower's RSS and
#     CPU over $WINDOW seconds (default 20);
#  3. failover, $ROUNDS times (default 3): SIGKILL the leader, then the time
#     until another one leads (its /metrics), until a command reaches a node
#     through it (`cutover nodes ping`, the CLI listing all three), and until
#     every agent is connected to it again. The killed one is restarted and
#     follows.
#
#   integration-tests/bench/etcd.sh
#   AGENTS=2000 ROUNDS=2 integration-tests/bench/etcd.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
agents=${AGENTS:-10000}
window=${WINDOW:-20}
rounds=${ROUNDS:-3}
source integration-tests/bench/sim-lib.sh
source scripts/etcd-env.sh
etcd_env_start >&2
trap 'etcd_env_stop; cleanup' EXIT

now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.2f", e - s }'; }
endpoints="\"${CUTOVER_TEST_ETCD_ENDPOINTS//,/\", \"}\""
# etcd_toml PREFIX [ADVERTISE]: the settings of a coordinator on the
# cluster, under PREFIX.
etcd_toml() {
  cat <<TOML
store = "etcd"
[etcd]
endpoints = [$endpoints]
prefix = "$1"
${2:+advertise = \"$2\"}
tls = { ca_cert = "$CUTOVER_TEST_ETCD_CA", cert = "$CUTOVER_TEST_ETCD_CERT", key = "$CUTOVER_TEST_ETCD_KEY" }
TOML
}

echo "## 1,000-node rollout: embedded store against etcd"
echo
for store in sled etcd; do
  if [ "$store" = etcd ]; then extra=$(etcd_toml "bench-rollout-$$/"); else extra=""; fi
  start_coordinator "rollout-$store" "$extra
[limits]
agent_queue = 64"
  start_sim 1000 --connect-rate 1000
  sim_spec 'batch = "10%"
min_healthy_time = "0s"' >"$work/cutover.toml"
  r0=$(ticks "$coordinator")
  "$cutover" deploy --env sim --file "$work/cutover.toml" --artifact "$work/app.tar.gz" --version v1 --wait >/dev/null
  r1=$(ticks "$coordinator")
  id=$("$cutover" rollout list -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
  echo "store: $store"
  echo
  rollout_report "$id" $((r1 - r0))
  echo
  kill "$sim_pid" "$coordinator"
  wait "$sim_pid" "$coordinator" 2>/dev/null || true
done

# Three coordinators on one prefix.
declare -a ha_pid ha_http ha_url ha_config
for i in 0 1 2; do
  grpc=$(free_port); ha_http[i]=$(free_port)
  ha_url[i]=https://127.0.0.1:$grpc
  ha_config[i]=$work/ha-$i.toml
  cat >"${ha_config[i]}" <<TOML
data_dir = "$work/data-ha-$i"
listen = "127.0.0.1:$grpc"
http_listen = "127.0.0.1:${ha_http[i]}"
ca_key = "$work/pki/ca.key"
$(etcd_toml "bench-ha-$$/" "${ha_url[i]}")
[tls]
ca_cert = "$work/pki/ca.crt"
cert = "$work/pki/coordinator.crt"
key = "$work/pki/coordinator.key"
TOML
done
start_ha() {
  "$cutover" server --config "${ha_config[$1]}" >>"$work/ha-$1.log" 2>&1 &
  ha_pid[$1]=$!
  pids+=("${ha_pid[$1]}")
}
metric() { curl -sf "http://127.0.0.1:${ha_http[$1]}/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
leader() {
  for i in 0 1 2; do
    [ "$(metric "$i" cutover_leading)" = 1 ] && { echo "$i"; return; }
  done
  return 1
}
for i in 0 1 2; do start_ha "$i"; done
until leader >/dev/null; do sleep 0.1; done
export CUTOVER_COORDINATOR="${ha_url[0]},${ha_url[1]},${ha_url[2]}"

echo "## $agents agents across 3 coordinators"
echo
start=$(now)
start_sim "$agents" --connect-rate 1000
connected=$(since "$start")
lead=$(leader)
follower=$(( (lead + 1) % 3 ))
sleep 5
l0=$(ticks "${ha_pid[lead]}"); f0=$(ticks "${ha_pid[follower]}")
sleep "$window"
l1=$(ticks "${ha_pid[lead]}"); f1=$(ticks "${ha_pid[follower]}")
echo "| agents | all connected after | leader RSS | leader CPU (one core) | follower RSS | follower CPU |"
echo "| --- | --- | --- | --- | --- | --- |"
awk -v n="$agents" -v c="$connected" -v lr="$(rss_mib "${ha_pid[lead]}")" -v fr="$(rss_mib "${ha_pid[follower]}")" \
  -v lc=$((l1 - l0)) -v fc=$((f1 - f0)) -v hz="$hz" -v w="$window" \
  'BEGIN { printf "| %d | %s s | %d MiB | %.1f%% | %d MiB | %.1f%% |\n", n, c, lr, 100 * lc / hz / w, fr, 100 * fc / hz / w }'
echo

echo "## Failover: leader SIGKILLed"
echo
echo "| round | another leads | first command sent (nodes ping) | every agent back |"
echo "| --- | --- | --- | --- |"
for round in $(seq "$rounds"); do
  lead=$(leader)
  killed=$(now)
  kill -9 "${ha_pid[lead]}"
  wait "${ha_pid[lead]}" 2>/dev/null || true
  until next=$(leader); do sleep 0.05; done
  leads=$(since "$killed")
  until "$cutover" nodes ping sim-00001 --timeout 1s >/dev/null 2>&1; do sleep 0.05; done
  command=$(since "$killed")
  until [ "$(metric "$next" cutover_agents_connected)" = "$agents" ]; do sleep 0.1; done
  back=$(since "$killed")
  echo "| $round | $leads s | $command s | $back s |"
  start_ha "$lead"
  until curl -sf "http://127.0.0.1:${ha_http[lead]}/healthz" >/dev/null; do sleep 0.1; done
done
