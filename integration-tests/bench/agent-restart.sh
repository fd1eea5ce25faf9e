#!/usr/bin/env bash
# Agent restarts under load (docs/benchmarks.md, "Agent restarts"): a node
# serving the test app through its agent's proxy, 8 keep-alive clients and
# a new connection every 10 ms, across a handoff (SIGHUP), a SIGKILL with a
# restart 200 ms later (the unit's RestartSec), and the same with the
# proxies' sockets kept by the service manager (systemd's fd store, its
# side played by the test). Release build; prints a markdown table.
#
#   integration-tests/bench/agent-restart.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --locked --release --workspace --bins
bin=$(cargo test --locked --release -p cutover-integration-tests --test agent_handoff --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "agent_handoff":
        print(m["executable"])' | tail -1)
"$bin" --ignored --exact restart_figures --nocapture --test-threads 1 2>/dev/null | grep '^|'
