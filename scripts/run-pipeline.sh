#!/usr/bin/env bash
# The main job: the whole pipeline through Prefect on the embedded demo data (tiny profile by
# default). Extra arguments go to `lmsys run` (e.g. --profile small --set folds.n_folds=3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
# A real Prefect server (workers and the UI need one); started once, reused afterwards.
eval "$(python -m flows.server ensure)"
lmsys run "$@"
