# Sourced by scripts/test.sh (and the demo with --with-db): a throw-away
# PostgreSQL cluster, its data in a temp dir, stopped (and removed) by
# pg_env_stop, which the caller runs on exit. Exports where it is:
#   CUTOVER_TEST_PG        127.0.0.1:PORT (loopback only, trust auth)
#   CUTOVER_TEST_PG_USER   postgres, the superuser to connect as
# and puts the server's bin dir first on PATH, so the tests, the agents they
# start and the releases' migrations find `psql` (Debian keeps initdb and
# pg_ctl off PATH, under /usr/lib/postgresql/VERSION/bin).
# Debian's postgresql is installed where missing (as root). PostgreSQL
# refuses to run as root: the cluster runs as the `postgres` user.

pg_env_dir=""
pg_env_bin=""

# The newest installed server's bin dir.
pg_env_find() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$found" ] && [ -x "$found/initdb" ] && echo "$found"
}

pg_env_install() {
  pg_env_bin=$(pg_env_find || true)
  [ -n "$pg_env_bin" ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: PostgreSQL is missing (Debian package postgresql); install it, or run this as root on Debian" >&2
    return 1
  fi
  echo "installing postgresql" >&2
  apt-get update -qq
  # Only the binaries: the package's own cluster is not used (and not
  # started: there may be no init system).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  pg_env_bin=$(pg_env_find) || {
    echo "error: installing postgresql gave no /usr/lib/postgresql/*/bin/initdb" >&2
    return 1
  }
}

# Runs a server binary as the postgres user (as root), or as oneself.
pg_env_as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Starts the cluster on 127.0.0.1:PORT (a free port when none is given).
pg_env_start() { # [port]
  pg_env_install
  local port=${1:-}
  if [ -z "$port" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  pg_env_dir=$(mktemp -d /tmp/cutover-pg.XXXXXX)
  [ "$(id -u)" != 0 ] || chown postgres: "$pg_env_dir"
  if ! pg_env_as_postgres "$pg_env_bin/initdb" -D "$pg_env_dir/data" -U postgres \
    --auth-local=trust --auth-host=trust -E UTF8 --locale=C.UTF-8 >"$pg_env_dir/initdb.log" 2>&1; then
    cat "$pg_env_dir/initdb.log" >&2
    return 1
  fi
  # Loopback only, so trust is trust in this machine's users; no fsync:
  # the data is thrown away.
  if ! pg_env_as_postgres "$pg_env_bin/pg_ctl" -D "$pg_env_dir/data" -l "$pg_env_dir/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $pg_env_dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null; then
    tail -20 "$pg_env_dir/server.log" >&2
    return 1
  fi
  export PATH="$pg_env_bin:$PATH"
  export CUTOVER_TEST_PG="127.0.0.1:$port"
  export CUTOVER_TEST_PG_USER=postgres
  echo "postgresql $("$pg_env_bin/postgres" --version | awk '{print $3}') at $CUTOVER_TEST_PG (user postgres, data in $pg_env_dir)" >&2
}

pg_env_stop() {
  [ -n "$pg_env_dir" ] || return 0
  if [ -f "$pg_env_dir/data/postmaster.pid" ]; then
    pg_env_as_postgres "$pg_env_bin/pg_ctl" -D "$pg_env_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$pg_env_dir"
  pg_env_dir=""
}
