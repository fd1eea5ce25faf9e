#!/usr/bin/env bash
# The demo: cutover doing its job on a local cluster with embedded defaults.
#
#  1. builds cutover and starts a coordinator and three agents on loopback
#     (127.0.0.11-13) with a fresh CA (`cutover dev up`);
#  2. deploys v1 of the sample web app (examples/demo) to every node;
#  3. rolls v2 out in batches while a load generator sends requests through
#     the three node proxies, then shows versions per node and the load's
#     sent/failed counts;
#  4. deploys a broken v3 whose health check turns bad after its cutover:
#     it is rolled back automatically, under load, and the reason is shown;
#  5. rolls v4 out as a canary (examples/demo/canary.toml appended to the
#     spec): each node proxy gives it 20 %, then 50 % of its clients (the
#     load comes from 1,000 client addresses), the proxies' analysis
#     compares it with v2 on the same nodes, then every node switches;
#     shows the verdicts and the load's answers by version;
#  6. stops everything (CUTOVER_DEMO_KEEP=1 leaves the cluster running).
#
# `--runtime docker` does the same with containers: the sample app is built
# as a static binary, baked into FROM-scratch images v1, v2 and v3, pushed to
# a local registry and deployed with --image (a Docker engine is started,
# and Debian's docker.io and docker-registry installed, where missing).
#
# `--with-db` gives the app a real PostgreSQL (Debian's postgresql, installed
# where missing, a throw-away cluster on 127.0.0.1:18432 stopped at the end;
# scripts/pg-env.sh) and the spec examples/demo/cutover-db.toml: each deploy
# runs the release's migrations once (`sh migrate.sh`: SQL files through
# psql) on one node before its first batch switches. v1 creates a table, v2
# adds a column that v2's code reads in its health check, while the load
# runs; the demo then shows the database's record of the runs.
#
# Exits 0 only if v2 rolled out with zero failed requests, v3 was rolled
# back with every node on v2, and v4's canary passed its analysis and
# rolled out with zero failed requests, every node on v4 (and, with --with-db, v2's migration ran exactly
# once and every node reads the column it added).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${CUTOVER_DEMO_DIR:-.dev}
keep=${CUTOVER_DEMO_KEEP:-0}
runtime=process
with_db=0
while [ $# -gt 0 ]; do
  case $1 in
    --runtime) runtime=${2:-}; shift 2 ;;
    --runtime=*) runtime=${1#--runtime=}; shift ;;
    --with-db) with_db=1; shift ;;
    *) echo "usage: $0 [--runtime process|docker] [--with-db]" >&2; exit 2 ;;
  esac
done
case $runtime in
  process|docker) ;;
  *) echo "--runtime must be process or docker, not ${runtime:-nothing}" >&2; exit 2 ;;
esac
if [ "$with_db" = 1 ] && [ "$runtime" = docker ]; then
  echo "--with-db runs the migration as a task, which the docker runtime does not run yet; use --runtime process" >&2
  exit 2
fi


# The sample app is a Python program; the demo reads the nodes with curl.
# shellcheck source=scripts/packages.sh
source scripts/packages.sh
need_package python3 python3 --no-install-recommends
need_package curl curl --no-install-recommends
cargo build --locked --workspace --bins
cutover=$PWD/target/debug/cutover
loadgen=$PWD/target/debug/loadgen

# shellcheck disable=SC1091
source scripts/pg-env.sh
# A demo started earlier in the same dir is replaced, not doubled (its
# database too, if it kept one: the port is the spec's).
if [ -f "$dir/coordinator.pid" ]; then
  "$cutover" dev down --dir "$dir"
fi
if [ -f "$dir/postgres-dir" ]; then
  pg_env_install
  pg_env_dir=$(cat "$dir/postgres-dir")
  pg_env_stop
  rm -f "$dir/postgres-dir"
fi
load_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  if [ "$keep" != 1 ]; then
    "$cutover" dev down --dir "$dir" >/dev/null 2>&1 || true
    [ "$runtime" != docker ] || docker_env_stop
    pg_env_stop
  fi
}
trap cleanup EXIT
if [ "$runtime" = docker ]; then
  # shellcheck disable=SC1091
  source scripts/docker-env.sh
  docker_env_engine
fi
db_port=18432
if [ "$with_db" = 1 ]; then
  pg_env_start "$db_port"
  mkdir -p "$dir"
  echo "$pg_env_dir" >"$dir/postgres-dir"
  # The spec's PG* variables name this database; so does every psql below.
  export PGHOST=127.0.0.1 PGPORT=$db_port PGUSER=postgres
  psql -X -q -d postgres -c "CREATE DATABASE demo"
  export PGDATABASE=demo
fi
"$cutover" dev up --nodes 3 --dir "$dir" --runtime "$runtime"
# shellcheck disable=SC1091
source "$dir/env"

# Four releases of the sample app: the same program with another VERSION;
# v3 also ships BROKEN, which fails its health check 3 s after it starts.
artifacts="$dir/artifacts"
rm -rf "$artifacts"
for version in v1 v2 v3 v4; do
  mkdir -p "$artifacts/$version"
  cp examples/demo/app.py "$artifacts/$version/"
  echo "$version" >"$artifacts/$version/VERSION"
done
echo 3 >"$artifacts/v3/BROKEN"
spec=examples/demo/cutover.toml
if [ "$with_db" = 1 ]; then
  # With a database: the migration runner and the migrations ship in the
  # release. v1 creates the greetings table; v2 adds a column (expand) and
  # its code reads it (QUERY, run by each health check), so v2 is healthy
  # only once its migration ran; v3 changes no schema.
  spec=examples/demo/cutover-db.toml
  for version in v1 v2 v3 v4; do
    cp examples/demo/pgwire.py examples/demo/migrate.sh "$artifacts/$version/"
    mkdir -p "$artifacts/$version/migrations"
    if [ "$version" = v1 ]; then
      cp examples/demo/migrations/001_*.sql "$artifacts/$version/migrations/"
      echo "SELECT text FROM greetings ORDER BY id LIMIT 1" >"$artifacts/$version/QUERY"
    else
      cp examples/demo/migrations/*.sql "$artifacts/$version/migrations/"
      echo "SELECT text || ' (' || language || ')' FROM greetings ORDER BY id LIMIT 1" >"$artifacts/$version/QUERY"
    fi
  done
fi
for version in v1 v2 v3 v4; do
  tar -C "$artifacts/$version" -czf "$artifacts/$version.tar.gz" .
done

if [ "$runtime" = docker ]; then
  # The same four versions as images: the sample app as a static binary
  # in an otherwise empty image. Local copies are removed after the push,
  # so the agents really pull them (by digest).
  spec=examples/demo/cutover-docker.toml
  rustc --edition 2021 -O -C target-feature=+crt-static -C strip=symbols \
    -o "$artifacts/sample-app" integration-tests/fixtures/sample-app.rs
  for version in v1 v2 v3 v4; do
    context="$artifacts/image-$version"
    mkdir -p "$context"
    cp "$artifacts/sample-app" "$context/"
    {
      echo "FROM scratch"
      echo "COPY sample-app /sample-app"
      echo "ENV VERSION=$version"
      [ "$version" != v3 ] || echo "ENV BROKEN=3"
      echo 'ENTRYPOINT ["/sample-app"]'
    } >"$context/Dockerfile"
    image="$CUTOVER_DEV_REGISTRY/demo/web:$version"
        # The CLI's notes about its builder go to the log, errors to the screen.
    if ! { docker build --quiet -t "$image" "$context" && docker push --quiet "$image" &&
      docker rmi "$image"; } >"$context/build.log" 2>&1; then
      cat "$context/build.log" >&2
      exit 1
    fi
    echo "  pushed $image"
  done
fi

# Deploys version $1 of the demo, as an artifact or an image, with the spec
# $2 (default: the demo's).
deploy() {
  local file=${2:-$spec}
  if [ "$runtime" = docker ]; then
    "$cutover" deploy -f "$file" --env local --image "$CUTOVER_DEV_REGISTRY/demo/web:$1" --wait
  else
    "$cutover" deploy -f "$file" --env local --version "$1" --artifact "$artifacts/$1.tar.gz" --wait
  fi
}
port=18080
mapfile -t addresses < <("$cutover" nodes --output json |
  python3 -c 'import json,sys; [print(n["address"]) for n in json.load(sys.stdin)]')
targets=()
for a in "${addresses[@]}"; do targets+=(--target "$a:$port"); done

versions() {
  for a in "${addresses[@]}"; do
    printf '  %s:%s  %s\n' "$a" "$port" "$(curl -fsS --max-time 2 "http://$a:$port/" || echo unreachable)"
  done
}

start_load() {
  "$loadgen" "${targets[@]}" --connections 6 --clients 1000 >"$dir/load-$1.json" &
  load_pid=$!
}

stop_load() {
  kill -TERM "$load_pid"
  wait "$load_pid" || true
  load_pid=""
  python3 - "$dir/load-$1.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
by = ", ".join("%s: %d" % (body.strip(), n) for body, n in sorted(r["by_body"].items()))
print("  requests sent %d, failed %d, in %.1f s (%.0f/s, p99 %.1f ms); answers by version: %s"
      % (r["sent"], r["failed"], r["elapsed_seconds"], r["requests_per_second"], r["p99_ms"], by))
for f in r["failures"]:
    print("  failure:", f)
EOF
}

failed_of() {
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["failed"])' "$dir/load-$1.json"
}

echo
echo "== 1. deploy v1 to every node"
deploy v1
versions

echo
echo "== 2. roll out v2 in batches while load runs through the node proxies"
start_load v2
sleep 1
started=$(date +%s.%N)
v2_ok=0
deploy v2 && v2_ok=1
took=$(python3 -c "import sys; print('%.1f' % ($(date +%s.%N) - $started))")
sleep 1
stop_load v2
echo "  rollout took ${took}s; versions per node:"
versions
if [ "$with_db" = 1 ]; then
  v2_rollout=$("$cutover" --output json rollout list --service web --limit 1 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
  echo "  the migration in the rollout's timeline (cutover rollout status $v2_rollout):"
  "$cutover" rollout status "$v2_rollout" | grep -E " (migration_|migrated|batch_started)" | head -8 | sed 's/^/  /'
  echo "  what v2's code reads from the new column, per node:"
  for a in "${addresses[@]}"; do
    printf '  %s:%s  %s\n' "$a" "$port" "$(curl -fsS --max-time 2 "http://$a:$port/db" || echo unreachable)"
  done
fi

echo
echo "== 3. deploy a broken v3: its health check fails 3 s after it starts"
start_load v3
sleep 1
deploy v3 || true
v3_state=$("$cutover" --output json rollout list --service web --limit 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["state"])')
sleep 1
stop_load v3
echo "  v3 rollout ended: $v3_state; versions per node:"
versions
echo
"$cutover" releases web --env local
if [ "$with_db" = 1 ]; then
  echo
  echo "  the database's record of the migration runs (one row per run, from migrate.sh):"
  psql -X -P pager=off -c "SELECT id, version, rollout, started_at::time(0) AS started, finished_at::time(0) AS finished FROM migration_runs ORDER BY id" | sed 's/^/  /'
fi

# Every node serves $1 (1) or not (0).
all_on() {
  local all=1
  for a in "${addresses[@]}"; do
    [ "$(curl -fsS --max-time 2 "http://$a:$port/" || true)" = "$1" ] || all=0
  done
  echo $all
}
all_v2=$(all_on v2)

echo
echo "== 4. roll v4 out as a canary: 20 %, then 50 % of each node's clients, judged by the proxies"
cat "$spec" examples/demo/canary.toml >"$dir/cutover-canary.toml"
start_load v4
sleep 1
v4_ok=0
deploy v4 "$dir/cutover-canary.toml" && v4_ok=1
sleep 1
stop_load v4
v4_rollout=$("$cutover" --output json rollout list --service web --limit 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
echo "  the canary's steps and analysis verdicts (cutover rollout status $v4_rollout):"
"$cutover" rollout status "$v4_rollout" | grep -E "^(canary|steps|analysis|  (success|latency)) " | sed 's/^/  /'
echo "  versions per node:"
versions
all_v4=$(all_on v4)

echo
v2_failed=$(failed_of v2)
v3_failed=$(failed_of v3)
v4_failed=$(failed_of v4)
db_ok=1
db_note=""
if [ "$with_db" = 1 ]; then
  # v2's migration ran exactly once (a row per run), to its end, and every
  # node's v2 reads the column it added.
  v2_runs=$(psql -X -At -c "SELECT count(*) FROM migration_runs WHERE version = 'v2' AND finished_at IS NOT NULL")
  v2_all_runs=$(psql -X -At -c "SELECT count(*) FROM migration_runs WHERE version = 'v2'")
  [ "$v2_runs" = 1 ] && [ "$v2_all_runs" = 1 ] || db_ok=0
  for a in "${addresses[@]}"; do
    [ "$(curl -fsS --max-time 2 "http://$a:$port/db" || true)" = "hello (en)" ] || db_ok=0
  done
  if [ "$db_ok" = 1 ]; then
    db_note="; v2's migration ran exactly once and every node reads the column it added"
  else
    db_note="; v2's migration ran $v2_all_runs time(s) ($v2_runs to its end), every node reads its column: $db_ok"
  fi
fi
if [ "$v2_ok" = 1 ] && [ "$v2_failed" = 0 ] && [ "$v3_state" = rolled_back ] && [ "$all_v2" = 1 ] &&
  [ "$v4_ok" = 1 ] && [ "$v4_failed" = 0 ] && [ "$all_v4" = 1 ] && [ "$db_ok" = 1 ]; then
  echo "demo passed: v2 rolled out with 0 failed requests; broken v3 rolled back ($v3_failed failed requests) with every node on v2; the v4 canary passed its analysis and rolled out with 0 failed requests; every node serves v4$db_note"
  result=0
else
  echo "demo FAILED: v2 ok=$v2_ok, failed requests v2=$v2_failed v3=$v3_failed v4=$v4_failed, v3 ended $v3_state, all nodes on v2 after v3=$all_v2, v4 ok=$v4_ok, all nodes on v4=$all_v4$db_note"
  result=1
fi
if [ "$keep" = 1 ]; then
  echo "the cluster keeps running (CUTOVER_DEMO_KEEP=1): source $dir/env; stop it with: $cutover dev down --dir $dir"
  [ "$with_db" = 0 ] || echo "its database too (psql -h 127.0.0.1 -p $db_port -U postgres demo); the next demo run stops it"
else
  echo "stopping the local cluster (CUTOVER_DEMO_KEEP=1 keeps it)"
fi
exit $result
