# Sourced by scripts/test.sh: a throw-away Redis for the queue tests, its
# files in a temp dir, stopped (and removed) by redis_env_stop, which the
# caller runs on exit. Exports where it is:
#   CUTOVER_TEST_REDIS     127.0.0.1:PORT (loopback only, no password)
# Debian's redis-server is installed where missing (as root); the
# package's own server is not used.

redis_env_dir=""

redis_env_start() { # [port]
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      echo "error: redis-server is missing (Debian package redis-server); install it, or run this as root on Debian" >&2
      return 1
    fi
    echo "installing redis-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  fi
  local port=${1:-}
  if [ -z "$port" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  redis_env_dir=$(mktemp -d /tmp/cutover-redis.XXXXXX)
  # No persistence: the data is thrown away.
  if ! redis-server --bind 127.0.0.1 --port "$port" --dir "$redis_env_dir" \
    --daemonize yes --pidfile "$redis_env_dir/redis.pid" --logfile "$redis_env_dir/redis.log" \
    --save "" --appendonly no >/dev/null; then
    echo "error: redis-server did not start on port $port" >&2
    return 1
  fi
  local tries=0
  until redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 50 ]; then
      tail -20 "$redis_env_dir/redis.log" >&2
      return 1
    fi
    sleep 0.1
  done
  export CUTOVER_TEST_REDIS="127.0.0.1:$port"
  echo "redis $(redis-server --version | awk '{print $3}') at $CUTOVER_TEST_REDIS (files in $redis_env_dir)" >&2
}

redis_env_stop() {
  [ -n "$redis_env_dir" ] || return 0
  if [ -f "$redis_env_dir/redis.pid" ]; then
    kill "$(cat "$redis_env_dir/redis.pid")" 2>/dev/null || true
  fi
  rm -rf "$redis_env_dir"
  redis_env_dir=""
}
