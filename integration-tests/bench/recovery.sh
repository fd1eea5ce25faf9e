#!/usr/bin/env bash
# Backup and restore drill times on a pgbench database (docs/benchmarks.md):
# a throw-away PostgreSQL with WAL archived by pgBackRest (default settings:
# gzip, one process), a database of `pgbench -i -s PGBENCH_SCALE` (default
# 70, about 1 GB), then through a coordinator and an agent: a full backup,
# an incremental one after 20 s of pgbench writes, and a restore drill of
# the latest backup plus the archived WAL while pgbench keeps writing. Prints
# a table of the agent's own measurements.
#
#   integration-tests/bench/recovery.sh
#   PGBENCH_SCALE=10 integration-tests/bench/recovery.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PGBENCH_SCALE=${PGBENCH_SCALE:-70}
# The test binary, built first; then run alone (the build is not timed).
bin=$(cargo test --locked -p cutover-integration-tests --test recovery --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "recovery":
        print(m["executable"])' | tail -1)
"$bin" --ignored --exact recovery_figures --nocapture --test-threads 1
