#!/usr/bin/env bash
# The dashboard's page weight and time to first render (docs/benchmarks.md):
# a coordinator, three agents and `cutover ui` on loopback, each page loaded
# UI_LOADS times (default 20) in headless chromium over WebDriver; prints a
# table from the browser's own Navigation and Paint Timing entries.
#
#   integration-tests/bench/ui.sh
#   UI_LOADS=50 integration-tests/bench/ui.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/packages.sh
need_package chromium chromium --no-install-recommends
need_package chromedriver chromium-driver --no-install-recommends
cargo build --locked --workspace --bins
# The test binary, built first; then run alone (the build is not timed).
bin=$(cargo test --locked -p cutover-integration-tests --test dashboard --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "dashboard":
        print(m["executable"])' | tail -1)
"$bin" --ignored --exact dashboard_figures --nocapture --test-threads 1
