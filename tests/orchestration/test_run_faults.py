"""A run that users stop, kill or start twice (issue 22), with real `lmsys run` processes on the test
Prefect server: orch_config.SMALL with two local worker processes (the tiny profile's own setting),
each stopped a few seconds after its workers start a task.

  two runs, one root   the second refuses at once, exit 2, naming the first (pid, host, flow run);
                       the first, sent SIGTERM (`kill`, `timeout`, `scancel`), ends within seconds:
                       exit 143, one line, no traceback, its workers gone, its flow run Crashed
  Ctrl-C               SIGINT to the run's process group (what a terminal sends): exit 130, one line,
                       workers gone, flow run Crashed
  SIGKILL              the run's workers exit within a few seconds by themselves; the flow run,
                       which nothing could end, is Crashed once the next command takes the root
  no server            `lmsys run` with nothing at PREFECT_API_URL starts a server there and runs
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orch_config import SMALL

RUN = {**SMALL, "orchestration.local_workers": 2}
WORKERS_GONE_S = 5.0            # "no worker outlives the run by more than a few seconds"
STOPPED_WITHIN_S = 30.0         # a stopped run ends within this (seconds, not the minutes of a task)


def default_sigint() -> None:
    """preexec_fn of a command the test stops with Ctrl-C: SIGINT back to its default, as a terminal has it.
    A shell starts background jobs with SIGINT ignored, their children inherit that, and Python then keeps
    it ignored (so does lmsys: a run started under nohup is not stopped by a stray Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _set_args(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def start_run(root: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`lmsys run` on `root` in its own session (its own process group, as a terminal gives it)."""
    return subprocess.Popen([sys.executable, "-m", "lmsys.cli", "run", "--root", str(root), *_set_args(RUN)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env, start_new_session=True,
                            preexec_fn=default_sigint)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_worker_task(root: Path, run: subprocess.Popen, timeout: float = 240) -> set[int]:
    """The pids of the run's worker processes once one of them runs a task (its .running marker)."""
    running = root / "artifacts" / "tiny" / ".running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, f"the run ended early ({run.returncode})"
        pids = set()
        for f in running.glob("*.json") if running.exists() else []:
            try:
                pids.add(json.loads(f.read_text())["pid"])
            except (OSError, ValueError):
                continue
        if pids - {run.pid}:
            kids = subprocess.run(["pgrep", "-P", str(run.pid), "-f", "multiprocessing.spawn"],
                                  capture_output=True, text=True).stdout.split()
            return {int(k) for k in kids} | (pids - {run.pid})
        time.sleep(0.2)
    raise AssertionError(f"no worker task started within {timeout} s")


def wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, timeout
    return proc.returncode, time.monotonic() - t0


def workers_left(pids: set[int], within: float = WORKERS_GONE_S) -> list[int]:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:                              # never leave them behind for the next test
        os.kill(p, signal.SIGKILL)
    return left


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def flow_run_of(url: str, root: Path) -> dict:
    """The flow run whose `root` parameter is this root (the newest)."""
    runs = api(url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    mine = [r for r in runs if (r.get("parameters") or {}).get("root") == str(root)]
    assert mine, f"no flow run with root {root}"
    return mine[0]


def state_of(url: str, run_id: str, settle_s: float = 10.0) -> str:
    """The flow run's state type, read until it is final or `settle_s` passed."""
    deadline = time.monotonic() + settle_s
    while True:
        state = api(url, f"/flow_runs/{run_id}")["state"]["type"]
        if state not in ("RUNNING", "PENDING") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def running_task_runs(url: str, run_id: str) -> list[str]:
    """The task runs of a flow run still Running or Pending (asserting it has task runs at all)."""
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert tasks
    return [t["name"] for t in tasks if t["state"]["type"] in ("RUNNING", "PENDING")]


def one_error_line(log: Path, what: str) -> str:
    """The run's stderr after the stop: exactly one line, an `error:` line naming `what`, no traceback."""
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    tail = [line for line in text.splitlines() if line.strip()][-1]
    assert tail.startswith("error: ") and what in tail, text[-3000:]
    return tail


def test_a_second_run_on_one_root_is_refused_and_sigterm_ends_the_first(prefect_server, tmp_path):
    root = tmp_path / "root"
    first = start_run(root, tmp_path / "first.log")
    try:
        workers = wait_for_worker_task(root, first)
        second = start_run(root, tmp_path / "second.log")
        rc, took = wait_exit(second, 60)
        err = (tmp_path / "second.log").read_text()
        assert rc == 2 and took < 30, f"exit {rc} after {took:.0f} s: {err[-3000:]}"    # at once, not after a training
        run = flow_run_of(prefect_server, root)
        line = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and "Traceback" not in err, err[-3000:]
        assert f"pid {first.pid} on {socket.gethostname()}" in line[0] and f"flow run {run['id']}" in line[0]
        assert not [r for r in api(prefect_server, "/flow_runs/filter", {"limit": 200})
                    if (r.get("parameters") or {}).get("root") == str(root) and r["id"] != run["id"]]   # no 2nd flow run

        first.send_signal(signal.SIGTERM)                                  # as `kill`, `timeout` and `scancel` do
        rc, took = wait_exit(first, STOPPED_WITHIN_S)
        assert rc == 143, f"exit {rc} after {took:.1f} s"
        assert workers_left(workers) == []
        one_error_line(tmp_path / "first.log", "terminated (SIGTERM)")
        assert state_of(prefect_server, run["id"]) == "CRASHED"
        assert running_task_runs(prefect_server, run["id"]) == []          # the stopped workers' tasks too
        assert not (root / "artifacts" / ".lease.json").exists()           # released: the next run may start
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


def test_ctrl_c_stops_the_run_and_its_workers(prefect_server, tmp_path):
    root = tmp_path / "root"
    run = start_run(root, tmp_path / "run.log")
    try:
        workers = wait_for_worker_task(root, run)
        os.killpg(run.pid, signal.SIGINT)                                  # the terminal's Ctrl-C: the whole group
        rc, took = wait_exit(run, STOPPED_WITHIN_S)
        assert rc == 130, f"exit {rc} after {took:.1f} s: {(tmp_path / 'run.log').read_text()[-3000:]}"
        assert workers_left(workers) == []
        one_error_line(tmp_path / "run.log", "interrupted (Ctrl-C, SIGINT)")
        flow_run = flow_run_of(prefect_server, root)
        assert state_of(prefect_server, flow_run["id"]) == "CRASHED"
        assert running_task_runs(prefect_server, flow_run["id"]) == []
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def test_sigkill_takes_the_workers_along_and_the_next_command_marks_the_flow_run_crashed(prefect_server, tmp_path):
    root = tmp_path / "root"
    run = start_run(root, tmp_path / "run.log")
    workers = wait_for_worker_task(root, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert workers_left(workers) == []                                     # by themselves: nothing of the run is left
    flow_run = flow_run_of(prefect_server, root)
    assert flow_run["state"]["type"] == "RUNNING"                          # nothing could report the kill ...
    # the next command on the root: one that runs whichever step the kill landed in (demo-data included)
    nxt = subprocess.run([sys.executable, "-m", "lmsys.cli", "step", "demo-data", "--root", str(root), *_set_args(RUN)],
                         capture_output=True, text=True, timeout=300)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert f"took over the run lease of pid {run.pid}" in nxt.stderr and "marked Crashed" in nxt.stderr
    assert state_of(prefect_server, flow_run["id"], settle_s=0) == "CRASHED"   # ... until the next command
    assert running_task_runs(prefect_server, flow_run["id"]) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_starts_a_prefect_server_when_none_answers(tmp_path):
    """No server at PREFECT_API_URL: `lmsys run` starts one there (persistent, telemetry off) instead
    of failing, or of starting a temporary one inside the run."""
    url = f"http://127.0.0.1:{_free_port()}/api"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
    env.pop("DO_NOT_TRACK", None)
    root = tmp_path / "root"
    run = start_run(root, tmp_path / "run.log", env)
    try:
        wait_for_worker_task(root, run)
        assert api(url, "/health") is True
        assert flow_run_of(url, root)["state"]["type"] == "RUNNING"        # the run reports to that server
        pid = int((home / "server.pid").read_text())
        assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in Path(f"/proc/{pid}/environ").read_text().replace("\0", "\n")
        run.send_signal(signal.SIGTERM)
        assert wait_exit(run, STOPPED_WITHIN_S)[0] == 143
        assert api(url, "/health") is True                                 # persistent: later runs reuse it
        assert "Timed out while attempting to connect" not in (tmp_path / "run.log").read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        if (home / "server.pid").exists():
            stop_group(int((home / "server.pid").read_text()))


def stop_group(pgid: int) -> None:
    """SIGTERM the process group (the server and its workers), SIGKILL what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(pgid, signal.SIGKILL)
