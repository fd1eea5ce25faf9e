#!/usr/bin/env bash
# Runs the whole test suite on a fresh clone: installs what the tests need,
# builds the binaries the end-to-end tests spawn, then runs every test.
# Extra arguments go to the test runner (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-analyze checks the units in deploy/systemd; install it where we can.
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing systemd (for systemd-analyze)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null \
    || echo "warning: could not install systemd; the unit verification test will be skipped"
fi

# promtool checks and unit-tests the alert rules in deploy/prometheus.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing prometheus (for promtool)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || echo "warning: could not install prometheus; the alert rule checks fail in CI"
fi

# The partition tests give each agent a network namespace of its own and cut
# links with iptables.
if ! { command -v ip && command -v iptables; } >/dev/null 2>&1; then
  echo "installing iproute2 and iptables (for the partition tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables >/dev/null
fi

# The docker runtime's tests run against a real engine and real registries.
source scripts/docker-env.sh
trap docker_env_stop EXIT
docker_env_start

cargo build --locked --workspace --bins
# nextest runs each test in its own process and ends with one summary line;
# plain cargo test is the fallback where it is not installed.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  cargo test --locked --workspace "$@"
fi
