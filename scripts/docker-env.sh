# Sourced by scripts/test.sh (and the demo with --runtime docker): makes a
# Docker engine and two local registries available, starting what is
# missing, and exports where they are:
#   DOCKER_HOST                  the engine's socket (unix://...)
#   CUTOVER_TEST_REGISTRY        127.0.0.1:5000, open
#   CUTOVER_TEST_AUTH_REGISTRY   127.0.0.1:5001, htpasswd login cutover/secret
# An engine that already answers is used as is. Otherwise Debian's docker.io
# is installed if needed and a dockerd runs with its data root in a temp dir;
# registries come from Debian's docker-registry. Whatever this started is
# stopped (and its temp dirs removed) by docker_env_stop, which the caller
# runs on exit.

docker_env_dir=""
docker_env_pids=()
docker_env_own_engine=0

docker_env_install() { # packages...
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "docker tests need $* installed (run as root on Debian to have them installed)" >&2
    return 1
  fi
  echo "installing $*" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

docker_env_wait() { # what, command...
  local what=$1
  shift
  for _ in $(seq 150); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "$what did not come up" >&2
  return 1
}

docker_env_registry() { # port, extra config
  local dir="$docker_env_dir/registry-$1"
  mkdir -p "$dir/data"
  cat > "$dir/config.yml" <<CONF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$1
$2
CONF
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  docker_env_pids+=($!)
  docker_env_wait "the registry on 127.0.0.1:$1" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$1"
}

# An engine: the one that answers, or a dockerd of our own.
docker_env_engine() {
  [ -n "$docker_env_dir" ] || docker_env_dir=$(mktemp -d /tmp/cutover-docker.XXXXXX)
  if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null 2>&1 || docker_env_install docker.io
    export DOCKER_HOST="unix://$docker_env_dir/docker.sock"
    docker_env_own_engine=1
    dockerd --data-root "$docker_env_dir/data" --exec-root "$docker_env_dir/exec" \
      --pidfile "$docker_env_dir/docker.pid" -H "$DOCKER_HOST" \
      >"$docker_env_dir/dockerd.log" 2>&1 &
    docker_env_pids+=($!)
    if ! docker_env_wait "dockerd" docker info; then
      tail -20 "$docker_env_dir/dockerd.log" >&2
      return 1
    fi
  fi
  export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
  command -v docker-registry >/dev/null 2>&1 || docker_env_install docker-registry
}

# The engine and the tests' two registries.
docker_env_start() {
  docker_env_engine
  # bcrypt, as the registry's htpasswd auth requires.
  python3 -W ignore -c 'import crypt; print("cutover:" + crypt.crypt("secret", crypt.mksalt(crypt.METHOD_BLOWFISH)))' \
    > "$docker_env_dir/htpasswd"
  docker_env_registry 5000 ""
  docker_env_registry 5001 "auth:
  htpasswd:
    realm: cutover-test
    path: $docker_env_dir/htpasswd"
  export CUTOVER_TEST_REGISTRY=127.0.0.1:5000
  export CUTOVER_TEST_AUTH_REGISTRY=127.0.0.1:5001
  echo "docker engine at $DOCKER_HOST, registries on $CUTOVER_TEST_REGISTRY and $CUTOVER_TEST_AUTH_REGISTRY (login cutover)" >&2
}

docker_env_stop() {
    # Our own engine's containers go first, so it stops quickly (an engine
  # that was already there is left alone: the tests remove their own).
  if [ "$docker_env_own_engine" = 1 ]; then
    local leftover
    leftover=$(docker ps -aq 2>/dev/null || true)
    [ -z "$leftover" ] || docker rm -f $leftover >/dev/null 2>&1 || true
  fi
  for pid in "${docker_env_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${docker_env_pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ -n "$docker_env_dir" ]; then
    # dockerd leaves overlay mounts behind if it was killed.
    grep -o "$docker_env_dir[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$docker_env_dir"
  fi
}
