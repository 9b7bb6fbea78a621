#!/usr/bin/env bash
# The test suite: unit tests, the tiny pipeline end to end, Prefect server + SLURM + DVC tests.
# Extra arguments go to pytest (e.g. -k validate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
# A real single-node SLURM for the orchestration tests (root only; the tests skip or fail without it).
if [ "$(id -u)" = 0 ] && [ -f ../shared/ci/start_slurm.sh ]; then
  bash ../shared/ci/start_slurm.sh || echo "[run-tests] SLURM did not start; the SLURM tests will say why"
fi
# Random order (pytest-random-order): modules shuffled, and the tests within each module; the seed is
# printed at the top ("--random-order-seed=N") and rerunning with that option repeats the order.
# PYTEST_ORDER=--random-order-bucket=none runs in file order.
python -m pytest -p no:cacheprovider --durations=25 "${PYTEST_ORDER:---random-order-bucket=module}" "$@"
