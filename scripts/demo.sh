#!/usr/bin/env bash
# Builds cutover and starts a local cluster on loopback: a coordinator and
# three agents (127.0.0.11-13) with a fresh CA, then shows the fleet.
# The cluster keeps running in the background; the script says how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${CUTOVER_DEMO_DIR:-.dev}
nodes=${CUTOVER_DEMO_NODES:-3}

cargo build --locked --workspace --bins
cutover=./target/debug/cutover

# A demo started earlier in the same dir is replaced, not doubled.
if [ -f "$dir/coordinator.pid" ]; then
  "$cutover" dev down --dir "$dir"
fi
"$cutover" dev up --nodes "$nodes" --dir "$dir"
# shellcheck disable=SC1091
source "$dir/env"

echo
echo "== cutover nodes"
"$cutover" nodes
echo
echo "== a command down every agent's stream"
for i in $(seq 1 "$nodes"); do
  "$cutover" nodes ping "node-$i"
done
echo
echo "== the coordinator's event log"
"$cutover" events
echo
echo "== metrics (first lines of $CUTOVER_METRICS_URL)"
curl -fsS "$CUTOVER_METRICS_URL" 2>/dev/null | grep -E '^cutover_(nodes|agents_connected)' || true
cat <<EOT

The cluster is still running. In your shell:
  source $dir/env
  $cutover nodes --output json
  $cutover dev down --dir $dir     # stop it
EOT
