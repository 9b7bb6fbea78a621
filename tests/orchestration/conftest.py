"""Real components for the orchestration tests: a Prefect server on 127.0.0.1 (random free port,
isolated PREFECT_HOME) for the whole session, and a single-node SLURM started by
../shared/ci/start_slurm.sh (needs root; missing -> skip with the reason, but fail under CI=true).

Pipelines stay small (tiny profile, 2 folds, one teacher, a 200-row demo) and each runs in its own
root under a tmp dir, never in the repo's artifacts/.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_SLURM = ROOT.parent / "shared" / "ci" / "start_slurm.sh"


def _unavailable(msg: str):
    print(f"\n[orchestration] {msg}", file=sys.stderr)
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME; PREFECT_API_URL
    and PREFECT_HOME point at it for this process (settings) and its children (environment)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115  (held open by the server for the session)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prefect server did not come up on {url}: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
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
        log.close()


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
    import flows.pipeline as p
    return p
