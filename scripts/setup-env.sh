#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install the pinned stack (idempotent: a stamp of the
# lock files' hash skips the install when nothing changed). Debian 12 + Python 3.11, CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && "$PY" -m venv .venv; }
fi
stamp=.venv/.lmsys-installed
want="$(cat requirements.lock constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup-env] installing the pinned environment into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, alone: the CPU wheel on disk; constraints keep everything else from replacing it.
  .venv/bin/python -m pip install -q torch==2.13.0 -c constraints.txt
  .venv/bin/python -m pip install -q -r requirements.lock -c constraints.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
