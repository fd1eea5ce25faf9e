#!/usr/bin/env bash
# Node proxy benchmark: cutover against nginx and HAProxy, in one run.
#
# One backend (nginx answering a fixed 200 "ok"), measured through:
#   direct      the backend itself (what no proxy costs)
#   agent       the whole cutover-agent: a `cutover dev up` node of one
#               agent serving a release that is itself such an nginx
#               (deployed with `cutover deploy`), its heartbeats and health
#               checks running beside the proxy as in production
#   proxy-bench the agent's proxy code alone (the proxy-bench binary)
#   split       proxy-bench splitting its traffic as for a canary at 20 %
#               (every request hashed to its cohort, given the cookie)
#   throttle    proxy-bench with a throttle lever in force (set high
#               enough to admit every request: what checking it costs)
#   nginx       nginx 1.22 as a keep-alive reverse proxy (1 worker)
#   haproxy     HAProxy 2.6 (1 thread, http-reuse always)
#   before      with PROXY_BENCH_BEFORE=path, an earlier build of
#               proxy-bench: a change measured against what it replaces
#   io-epoll    only when named in TARGETS: the io-probe binary, a
#   io-uring    minimal pass-through loop on tokio's epoll reactor and on
#               io_uring (tokio-uring): what io_uring saves in the socket
#               loop alone
# at 8 and at 64 connections, the targets interleaved within each round.
# Every proxy and its backend share core 0 (one worker each); wrk runs on
# core 1, so the figures compare CPU cost per proxied request. The CPU
# time the proxy process used during each run is read from /proc and
# divided by the requests: user and system microseconds per request.
#
#   integration-tests/bench/proxy.sh          # 3 rounds of 8 s per target and concurrency
#   ROUNDS=5 DURATION=20s CONCURRENCY="64" TARGETS="agent nginx" integration-tests/bench/proxy.sh
#   TARGETS="io-epoll io-uring proxy-bench nginx" integration-tests/bench/proxy.sh
#
# Installs nginx, HAProxy and wrk (Debian packages) when they are missing
# and builds the release binaries. Prints markdown tables for
# docs/benchmarks.md. Traffic stays on loopback; run as root (the agent's
# dev cluster binds 127.0.0.11).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-3}
duration=${DURATION:-8s}
concurrency=${CONCURRENCY:-8 64}
targets=${TARGETS:-direct agent proxy-bench split throttle nginx haproxy}
backend_port=18081
bench_port=18082
nginx_port=18083
split_port=18084
throttle_port=18085
haproxy_port=18087
before_port=18088
io_epoll_port=18089
io_uring_port=18090
agent_addr=127.0.0.11:18086

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || ! command -v haproxy >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk haproxy >/dev/null
fi
cargo build --release --locked --bin proxy-bench --bin cutover --bin cutover-agent
if [[ " $targets " == *" io-"* ]]; then
  cargo build --release --locked --features cutover-integration-tests/io-uring-probe --bin io-probe
fi
cutover=$PWD/target/release/cutover

work=$(mktemp -d)
pids=()
cleanup() {
  "$cutover" dev down --dir "$work/dev" >/dev/null 2>&1 || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The backend's server block, for the standalone backend and the release.
backend_server() { echo "server { listen $1; location / { return 200 \"ok\n\"; } }"; }
nginx_conf() { # file, pid file, server block(s)
  cat > "$1" <<CONF
worker_processes 1;
daemon off;
pid $2;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $3
}
CONF
}
nginx_conf "$work/backend.conf" "$work/backend.pid" "$(backend_server 127.0.0.1:$backend_port)"
nginx_conf "$work/proxy.conf" "$work/proxy.pid" "upstream backend { server 127.0.0.1:$backend_port; keepalive 256; }
  server { listen 127.0.0.1:$nginx_port; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend bench
  bind 127.0.0.1:$haproxy_port
  default_backend backend
backend backend
  server nginx 127.0.0.1:$backend_port
CONF

taskset -c 0 nginx -p "$work" -c "$work/backend.conf" 2>"$work/backend.log" & pids+=($!)
taskset -c 0 nginx -p "$work" -c "$work/proxy.conf" 2>"$work/proxy.log" & pids+=($!)
nginx_master=$!
taskset -c 0 haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & pids+=($!)
haproxy_pid=$!
bench() { # port, log, extra args
  local port=$1 log=$2
  shift 2
  PROXY_BENCH_THREADS=${PROXY_BENCH_THREADS:-1} taskset -c 0 target/release/proxy-bench \
    --listen 127.0.0.1:$port --upstream 127.0.0.1:$backend_port "$@" 2>"$work/$log.log" &
  pids+=($!)
}
bench $bench_port proxy-bench; bench_pid=$!
bench $split_port split --split-weight 20; split_pid=$!
bench $throttle_port throttle --throttle-rps 100000000; throttle_pid=$!
# PROXY_BENCH_BEFORE=path: an earlier build of proxy-bench as target
# "before", to measure a change against in the same run.
before_pid=
if [ -n "${PROXY_BENCH_BEFORE:-}" ]; then
  PROXY_BENCH_THREADS=${PROXY_BENCH_THREADS:-1} taskset -c 0 "$PROXY_BENCH_BEFORE" \
    --listen 127.0.0.1:$before_port --upstream 127.0.0.1:$backend_port 2>"$work/before.log" &
  pids+=($!); before_pid=$!
  [[ " $targets " == *" before "* ]] || targets="$targets before"
fi

io_epoll_pid= io_uring_pid=
for io in epoll uring; do
  [[ " $targets " == *" io-$io "* ]] || continue
  port_var=io_${io}_port
  taskset -c 0 target/release/io-probe --io $io --listen 127.0.0.1:${!port_var} \
    --upstream 127.0.0.1:$backend_port 2>"$work/io-$io.log" &
  pids+=($!); printf -v "io_${io}_pid" %s $!
done

# The whole agent: a dev cluster of one node, its release an nginx.
agent_pid=
if [[ " $targets " == *" agent "* ]]; then
  # Started on core 0, as the other proxies and their backend: the agent
  # (and so its proxy, one runtime per core it may use), the coordinator
  # and the release's nginx all inherit the affinity.
  taskset -c 0 "$cutover" dev up --nodes 1 --dir "$work/dev" >"$work/dev-up.log"
  # shellcheck disable=SC1091
  source "$work/dev/env"
  mkdir -p "$work/release"
  nginx_conf "$work/release/nginx.conf.in" nginx.pid "$(backend_server @HOST@:@PORT@)"
  tar -C "$work/release" -czf "$work/release.tar.gz" .
  cat > "$work/bench.toml" <<SPEC
app = "bench"

[services.web]
command = ["sh", "-c", "sed \"s/@HOST@/\$HOST/; s/@PORT@/\$PORT/\" nginx.conf.in > nginx.conf && exec nginx -p \"\$PWD\" -c \"\$PWD/nginx.conf\""]
listen = "$agent_addr"
nodes = { role = "web" }

[services.web.health]
path = "/"

[strategy]
kind = "rolling"

[environments.local]
nodes = { env = "local" }
SPEC
  "$cutover" deploy -f "$work/bench.toml" --env local --version v1 \
    --artifact "$work/release.tar.gz" --wait >"$work/deploy.log"
  agent_pid=$(cat "$work/dev/agent-1.pid")
fi

for port in $backend_port $bench_port $split_port $throttle_port $nginx_port $haproxy_port \
  ${before_pid:+$before_port} ${io_epoll_pid:+$io_epoll_port} ${io_uring_pid:+$io_uring_port}; do
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

# User and system CPU time of a process (all its threads) so far, in clock ticks.
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

run() { # url, connections, [proxy pid] -> "rps p50_us p99_us user_us_per_request sys_us_per_request"
  local out u0=0 s0=0 u1=0 s1=0
  [ -n "${3:-}" ] && read -r u0 s0 < <(cpu_ticks "$3")
  out=$(taskset -c 1 wrk -t1 -c"$2" -d"$duration" --latency "$1")
  [ -n "${3:-}" ] && read -r u1 s1 < <(cpu_ticks "$3")
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "errors in the run against $1:" >&2
    echo "$out" >&2
    exit 1
  fi
  local rps p50 p99 n tick_us=$((1000000 / $(getconf CLK_TCK)))
  rps=$(echo "$out" | awk '/Requests\/sec/ { printf "%.0f", $2 }')
  p50=$(echo "$out" | grep -E '^ +50%' | to_us)
  p99=$(echo "$out" | grep -E '^ +99%' | to_us)
  n=$(echo "$out" | awk '/requests in/ { print $1 }')
  awk -v r="$rps" -v a="$p50" -v b="$p99" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$n" -v t="$tick_us" \
    'BEGIN { printf "%s %s %s %.2f %.2f\n", r, a, b, u*t/n, s*t/n }'
}

target_of() { # target -> "url pid"
  case $1 in
    direct) echo "http://127.0.0.1:$backend_port/ -" ;;
    agent) echo "http://$agent_addr/ $agent_pid" ;;
    proxy-bench) echo "http://127.0.0.1:$bench_port/ $bench_pid" ;;
    split) echo "http://127.0.0.1:$split_port/ $split_pid" ;;
    throttle) echo "http://127.0.0.1:$throttle_port/ $throttle_pid" ;;
    nginx) echo "http://127.0.0.1:$nginx_port/ $nginx_proxy_worker" ;;
    haproxy) echo "http://127.0.0.1:$haproxy_port/ $haproxy_pid" ;;
    before) echo "http://127.0.0.1:$before_port/ $before_pid" ;;
    io-epoll) echo "http://127.0.0.1:$io_epoll_port/ $io_epoll_pid" ;;
    io-uring) echo "http://127.0.0.1:$io_uring_port/ $io_uring_pid" ;;
    *) echo "unknown target $1" >&2; exit 2 ;;
  esac
}

# Warm up every target (connections, caches, the release's first requests).
for target in $targets; do
  read -r url _ < <(target_of "$target")
  taskset -c 1 wrk -t1 -c64 -d2s "$url" >/dev/null
done

declare -A rps p50 p99 usr sys
for round in $(seq "$rounds"); do
  for c in $concurrency; do
    for target in $targets; do
      read -r url pid < <(target_of "$target")
      [ "$pid" = - ] && pid=
      read -r r a b u s < <(run "$url" "$c" "$pid")
      k="$target/$c"
      rps[$k]+="$r "; p50[$k]+="$a "; p99[$k]+="$b "; usr[$k]+="$u "; sys[$k]+="$s "
      echo "round $round c$c $target: $r req/s, p50 ${a}us, p99 ${b}us, proxy CPU per request ${u}us user ${s}us system" >&2
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR]=$1 } END { print a[int((NR+1)/2)] }'; }
med() { echo "${1:-}" | median; }
has() { [[ " $targets " == *" $1 "* ]]; }

for c in $concurrency; do
  echo
  echo "c$c:"
  echo
  echo "| target | requests/s | vs nginx | p50 | p99 | added p99 vs nginx | user µs/req | system µs/req |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  nr=0; np=0
  if has nginx; then nr=$(med "${rps[nginx/$c]}"); np=$(med "${p99[nginx/$c]}"); fi
  for target in $targets; do
    k="$target/$c"
    r=$(med "${rps[$k]}"); a=$(med "${p50[$k]}"); b=$(med "${p99[$k]}")
    u=$(med "${usr[$k]}"); s=$(med "${sys[$k]}")
    awk -v t="$target" -v r="$r" -v a="$a" -v b="$b" -v nr="$nr" -v np="$np" -v u="$u" -v s="$s" -v d="$([ "$target" = direct ] && echo 1 || echo 0)" \
      'BEGIN { vs = nr ? sprintf("%.2f", r/nr) : "-"; added = nr ? sprintf("%d µs", b-np) : "-";
        cpu_u = d ? "-" : sprintf("%.1f", u); cpu_s = d ? "-" : sprintf("%.1f", s);
        printf "| %s | %d | %s | %d µs | %d µs | %s | %s | %s |\n", t, r, vs, a, b, added, cpu_u, cpu_s }'
  done
done
if [ -n "$bench_pid" ]; then
  echo
  echo "proxy-bench RSS after the runs: $(awk '/VmRSS/ { print $2 }' /proc/$bench_pid/status) KiB"
fi
if [ -n "$agent_pid" ]; then
  echo "cutover-agent RSS after the runs: $(awk '/VmRSS/ { print $2 }' /proc/$agent_pid/status) KiB"
fi
echo "($rounds rounds of $duration per target and concurrency, interleaved, medians; proxies and backends on core 0, wrk -t1 on core 1)"
