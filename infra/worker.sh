#!/usr/bin/env bash
# The trimpi worker service: register the work pool and the deployment from prefect.yaml, then
# run a Prefect process worker that executes the scheduled reinternalize runs in this checkout.
# infra/systemd/trimpi-worker.service runs exactly this; by hand:
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api infra/worker.sh [CHECKOUT]
#
# CHECKOUT defaults to $TRIMPI_WORKSPACE, else the checkout this script lives in. Re-running it
# (a restart after `git pull`) re-registers the deployment, so prefect.yaml's schedules and
# concurrency limit on the server follow the checkout. Env knobs: TRIMPI_BIN (default
# CHECKOUT/.venv/bin), TRIMPI_POOL (trimpi, as prefect.yaml's work_pool.name), TRIMPI_DEPLOYMENT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${1:-${TRIMPI_WORKSPACE:-$here}}"
export TRIMPI_WORKSPACE="$PWD"            # prefect.yaml's pull step cd's here in every flow run
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
export PREFECT_API_URL
BIN="${TRIMPI_BIN:-$PWD/.venv/bin}"
POOL="${TRIMPI_POOL:-trimpi}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PATH="$BIN:$PATH"

# the server may still be starting (systemd starts both units together): wait for it
for _ in $(seq 1 90); do
  "$BIN/python" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" \
    "$PREFECT_API_URL" 2>/dev/null && break
  sleep 2
done
"$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$POOL" --type process
"$BIN/prefect" --no-prompt deploy --name "${TRIMPI_DEPLOYMENT:-reinternalize-nightly}"
exec "$BIN/prefect" worker start --pool "$POOL" --type process --name "trimpi-$(hostname)"
