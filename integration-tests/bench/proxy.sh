#!/usr/bin/env bash
# Proxy overhead benchmark.
#
# One backend (nginx answering a fixed 200 "ok"), measured four ways with
# wrk: directly, through the cutover node proxy (the agent's proxy code, run
# by the proxy-bench binary), through the same proxy splitting its traffic
# as for a canary at 20 % (every request hashed to its cohort and given the
# cohort cookie, as new clients are), through the same proxy with a
# throttle lever in force (per client address, set high enough to admit
# every request: what checking it costs), and through nginx as a keep-alive
# reverse proxy. The proxies and the backend share core 0 (one worker each), wrk
# runs on core 1, so the figures compare CPU cost per proxied request.
#
#   integration-tests/bench/proxy.sh          # 3 rounds of 10 s per target
#   ROUNDS=5 DURATION=20s CONNS=100 integration-tests/bench/proxy.sh
#
# Installs nginx and wrk (Debian packages) when they are missing. Prints a
# markdown table for docs/benchmarks.md. Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-3}
duration=${DURATION:-10s}
conns=${CONNS:-50}
backend_port=18081
cutover_port=18082
nginx_port=18083
split_port=18084
throttle_port=18085

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
cargo build --release --locked -p cutover-integration-tests --bin proxy-bench

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

nginx_conf() { # name, server block
  cat > "$work/$1.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/$1.pid;
error_log $work/$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $2
}
CONF
}
nginx_conf backend "server { listen 127.0.0.1:$backend_port; location / { return 200 \"ok\n\"; } }"
nginx_conf proxy "upstream backend { server 127.0.0.1:$backend_port; keepalive 256; }
  server { listen 127.0.0.1:$nginx_port; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

taskset -c 0 nginx -p "$work" -c "$work/backend.conf" & pids+=($!)
taskset -c 0 nginx -p "$work" -c "$work/proxy.conf" & pids+=($!)
nginx_master=$!
PROXY_BENCH_THREADS=${PROXY_BENCH_THREADS:-1} taskset -c 0 target/release/proxy-bench \
  --listen 127.0.0.1:$cutover_port --upstream 127.0.0.1:$backend_port 2>"$work/proxy-bench.log" & pids+=($!)
proxy_pid=$!
PROXY_BENCH_THREADS=${PROXY_BENCH_THREADS:-1} taskset -c 0 target/release/proxy-bench \
  --listen 127.0.0.1:$split_port --upstream 127.0.0.1:$backend_port --split-weight 20 \
  2>"$work/proxy-bench-split.log" & pids+=($!)
split_pid=$!
PROXY_BENCH_THREADS=${PROXY_BENCH_THREADS:-1} taskset -c 0 target/release/proxy-bench \
  --listen 127.0.0.1:$throttle_port --upstream 127.0.0.1:$backend_port --throttle-rps 100000000 \
  2>"$work/proxy-bench-throttle.log" & pids+=($!)
throttle_pid=$!

for port in $backend_port $cutover_port $split_port $throttle_port $nginx_port; do
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    sleep 0.05
  done
done

# The worker, not the master, does nginx's proxying.
nginx_proxy_worker=$(pgrep -P "$nginx_master" || true)
[ -n "$nginx_proxy_worker" ] || { echo "no worker process under nginx $nginx_master" >&2; exit 1; }

# wrk's latency lines ("  99%    1.23ms") in microseconds.
to_us() { awk '{ v=$2; u=v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
  m = (u=="us") ? 1 : (u=="ms") ? 1000 : (u=="s") ? 1000000 : 1; printf "%.0f", v*m }'; }

# User and system CPU time of a process so far, in clock ticks.
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

run() { # port [proxy pid] -> "rps p50_us p99_us user_us_per_request sys_us_per_request"
  local out u0=0 s0=0 u1=0 s1=0
  [ -n "${2:-}" ] && read -r u0 s0 < <(cpu_ticks "$2")
  out=$(taskset -c 1 wrk -t1 -c"$conns" -d"$duration" --latency "http://127.0.0.1:$1/")
  [ -n "${2:-}" ] && read -r u1 s1 < <(cpu_ticks "$2")
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "errors in the run against port $1:" >&2
    echo "$out" >&2
    exit 1
  fi
  local rps p50 p99
  rps=$(echo "$out" | awk '/Requests\/sec/ { printf "%.0f", $2 }')
  p50=$(echo "$out" | grep -E '^ +50%' | to_us)
    p99=$(echo "$out" | grep -E '^ +99%' | to_us)
  local n tick_us=$((1000000 / $(getconf CLK_TCK)))
  n=$(echo "$out" | awk '/requests in/ { print $1 }')
  awk -v r="$rps" -v a="$p50" -v b="$p99" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$n" -v t="$tick_us" \
    'BEGIN { printf "%s %s %s %.2f %.2f\n", r, a, b, u*t/n, s*t/n }'
}

median() { sort -n | awk '{ a[NR]=$1 } END { print a[int((NR+1)/2)] }'; }

for port in $backend_port $cutover_port $split_port $throttle_port $nginx_port; do
  taskset -c 1 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null
done

declare -A rps p50 p99 usr sys
for round in $(seq "$rounds"); do
  for target in direct cutover split throttle nginx; do
    case $target in
      direct) port=$backend_port; pid= ;;
      cutover) port=$cutover_port; pid=$proxy_pid ;;
      split) port=$split_port; pid=$split_pid ;;
      throttle) port=$throttle_port; pid=$throttle_pid ;;
      nginx) port=$nginx_port; pid=$nginx_proxy_worker ;;
    esac
    read -r r a b u s < <(run $port $pid)
    rps[$target]+="$r "; p50[$target]+="$a "; p99[$target]+="$b "; usr[$target]+="$u "; sys[$target]+="$s "
    echo "round $round $target: $r req/s, p50 ${a}us, p99 ${b}us, proxy CPU per request ${u}us user ${s}us system" >&2
  done
done

rss_kib=$(awk '/VmRSS/ { print $2 }' /proc/$proxy_pid/status)
med() { tr ' ' '\n' | grep -v '^$' | median; }
direct_rps=$(echo "${rps[direct]}" | med)
direct_p99=$(echo "${p99[direct]}" | med)
echo
echo "| target | requests/s | p50 | p99 | throughput vs direct | added p99 |"
echo "| --- | --- | --- | --- | --- | --- |"
for target in direct cutover split throttle nginx; do
  r=$(echo "${rps[$target]}" | med); a=$(echo "${p50[$target]}" | med); b=$(echo "${p99[$target]}" | med)
  awk -v t="$target" -v r="$r" -v a="$a" -v b="$b" -v dr="$direct_rps" -v dp="$direct_p99" \
    'BEGIN { printf "| %s | %d | %d µs | %d µs | %.2f | %d µs |\n", t, r, a, b, r/dr, b-dp }'
done
c=$(echo "${rps[cutover]}" | med); n=$(echo "${rps[nginx]}" | med)
awk -v c="$c" -v n="$n" 'BEGIN { printf "\ncutover proxy / nginx requests/s: %.2f\n", c/n }'
sp=$(echo "${rps[split]}" | med)
awk -v s="$sp" -v c="$c" 'BEGIN { printf "cutover proxy splitting at 20 %% / plain requests/s: %.2f\n", s/c }'
th=$(echo "${rps[throttle]}" | med)
awk -v s="$th" -v c="$c" 'BEGIN { printf "cutover proxy with a throttle in force / plain requests/s: %.2f\n", s/c }'
echo
echo "| proxy | user CPU per request | system CPU per request | total |"
echo "| --- | --- | --- | --- |"
for target in cutover split throttle nginx; do
  u=$(echo "${usr[$target]}" | med); s=$(echo "${sys[$target]}" | med)
  awk -v t="$target" -v u="$u" -v s="$s" 'BEGIN { printf "| %s | %.2f µs | %.2f µs | %.2f µs |\n", t, u, s, u+s }'
done
# What 1.1 times nginx's rate leaves the proxy: core 0 runs the proxy and the
# backend, so the backend's share per request is what nginx's run left over.
nu=$(echo "${usr[nginx]}" | med); ns=$(echo "${sys[nginx]}" | med)
awk -v n="$n" -v nu="$nu" -v ns="$ns" 'BEGIN { rest = 1e6/n - nu - ns;
  printf "\nproxy CPU per request that 1.1 times nginx requests/s would allow: %.2f µs\n", 1e6/(1.1*n) - rest }'
echo "cutover proxy RSS after the runs: ${rss_kib} KiB"
echo "($rounds rounds of $duration, $conns connections, medians; proxies and backend on core 0, wrk on core 1)"
