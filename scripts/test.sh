#!/usr/bin/env bash
# Runs the whole test suite on a fresh clone: installs what the tests need,
# builds the binaries the end-to-end tests spawn, then runs every test.
# Extra arguments go to the test runner (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every tool a test needs is installed here, or the run fails: no test skips
# itself for want of one. Debian's packages, as root.
# shellcheck source=scripts/packages.sh
source scripts/packages.sh
# systemd-analyze checks the units in deploy/systemd.
need_package systemd-analyze systemd
# promtool checks and unit-tests the alert rules in deploy/prometheus.
need_package promtool prometheus --no-install-recommends
# The partition tests give each agent a network namespace of its own and cut
# links with iptables.
need_package ip iproute2
need_package iptables iptables
# The install guide's test creates the service users and runs the daemons
# as them.
need_package useradd passwd
need_package runuser util-linux
# The backup and restore tests back a throw-away cluster up with pgBackRest.
need_package pgbackrest pgbackrest --no-install-recommends
# The load balancer tests put a real HAProxy in front of the node proxies.
need_package haproxy haproxy --no-install-recommends
# The dashboard's tests drive a headless chromium through chromedriver.
need_package chromium chromium --no-install-recommends
need_package chromedriver chromium-driver --no-install-recommends

# The runner: nextest, for its per-test timeouts (.config/nextest.toml);
# built from crates.io where the machine lacks it.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest (per-test timeouts)"
  cargo install --locked cargo-nextest
fi

# The docker runtime's tests run against a real engine and real registries;
# the migration tests against a real PostgreSQL, one throw-away cluster for
# the whole run (a database per test).
# The queue tests against a real Redis, one throw-away server for the run.
# The etcd store's tests against a real three-member etcd cluster over
# mutual TLS, one for the run (a key prefix per test); a test may kill and
# restart its members.
source scripts/docker-env.sh
source scripts/pg-env.sh
source scripts/redis-env.sh
source scripts/etcd-env.sh
trap 'docker_env_stop; pg_env_stop; redis_env_stop; etcd_env_stop' EXIT
docker_env_start
pg_env_start
redis_env_start
etcd_env_start

# A clean build and the run take about 10 GiB under target/ and /tmp; say so
# before the compiler dies with "No space left on device" half-way through.
free_gib=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
if [ "$free_gib" -lt 12 ]; then
  echo "error: $free_gib GiB free on the disk of $(pwd); the build and tests need about 12 GiB: free some (cargo clean in old checkouts, /tmp) and rerun" >&2
  exit 1
fi
# A clean clone gains nothing from incremental compilation, which writes
# gigabytes it never reads again.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi
cargo build --locked --workspace --bins
# nextest runs each test in its own process, kills one that hangs, and ends
# with one summary line.
cargo nextest run --locked --workspace --no-fail-fast "$@"
