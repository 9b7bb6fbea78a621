"""Real components for the orchestration tests: a Prefect server on 127.0.0.1 (a port the kernel
picks, isolated PREFECT_HOME; lineage_support.start_prefect_server) for the whole session, and a
single-node SLURM started by ../shared/ci/start_slurm.sh (needs root; missing -> skip with the reason, but fail under CI=true).

Pipelines stay small (tiny profile, 2 folds, one teacher, a 200-row demo) and each runs in its own
root under a tmp dir, never in the repo's artifacts/.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_SLURM = ROOT.parent / "shared" / "ci" / "start_slurm.sh"


def _unavailable(msg: str):
    print(f"\n[orchestration] {msg}", file=sys.stderr)
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _drain_prefect_workers() -> None:
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception as e:                          # noqa: BLE001  (best effort at teardown)
        print(f"[orchestration] could not drain Prefect's log/event workers: {e!r}", file=sys.stderr)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 (a port the kernel picks) with its own PREFECT_HOME; PREFECT_API_URL
    and PREFECT_HOME point at it for this process (settings) and its children (environment)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from lineage_support import start_prefect_server
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1"}
    log = home / "server.log"
    try:
        proc, url = start_prefect_server(env, log, wait_s=120)
    except RuntimeError as e:
        pytest.fail(str(e))
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _drain_prefect_workers()                    # send buffered logs/events while the server is up
        try:
            os.killpg(proc.pid, signal.SIGTERM)     # the server and the uvicorn it started
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node SLURM (partition gpu, fake GRES gpu:2)."""
    if not START_SLURM.exists():
        _unavailable(f"{START_SLURM} is missing (../shared is laid beside the repo in CI)")
    if os.geteuid() != 0:
        _unavailable("SLURM tests need root (start_slurm.sh installs and starts slurmctld/slurmd)")
    r = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0:
        pytest.fail(f"start_slurm.sh failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return "gpu"


@pytest.fixture(scope="session")
def pipeline_api(prefect_server):
    """flows.pipeline, imported once the test server's settings are in place."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows import pipeline
    return pipeline
