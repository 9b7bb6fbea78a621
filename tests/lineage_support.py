"""Helpers of tests/test_dvc.py and tests/test_deployments.py: a git copy of the working tree with a
reduced tiny profile, subprocess runs with an isolated environment, a real Prefect server, and a
few Prefect REST calls (the test process's own Prefect settings are never touched)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# The reduced pipeline: tiny profile, 2 folds, one teacher, 200 demo rows, one epoch, short texts.
REDUCED = {"folds": {"n_folds": 2}, "models": {"teachers": ["llama"]},
           "demo": {"rows": 200, "test_rows": 40, "external_rows": 40, "ut_rows": 60},
           "train_teacher": {"epochs": 1}, "distill": {"epochs": 1},
           "text": {"train_max_length": 128, "infer_max_length": 128, "prompt_tokens": 32}}


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = _merge(a.get(k) or {}, v) if isinstance(v, dict) else v
    return a


def base_env(repo: Path, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_HOME": str(tmp / "prefect-home"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def sh(cmd: list[str] | str, cwd: Path, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       shell=isinstance(cmd, str))
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def edit_params(repo: Path, profile_over: dict) -> None:
    """Deep-merge `profile_over` into params.yaml's profiles.tiny (comments are lost: a tmp copy)."""
    p = repo / "params.yaml"
    d = yaml.safe_load(p.read_text())
    _merge(d["profiles"]["tiny"], profile_over)
    p.write_text(yaml.safe_dump(d, sort_keys=False))


def make_copy(dest: Path, tmp: Path) -> tuple[Path, dict]:
    """The working tree's tracked + untracked-not-ignored files in `dest`, reduced params, dvc.yaml
    regenerated, committed in a fresh git repo. Returns (repo, env)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() and not f.startswith(("data/", "artifacts/", "reports/")) and f != "dvc.lock":
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    env = base_env(dest, tmp)
    edit_params(dest, REDUCED)
    sh(["lmsys", "dvc-yaml"], dest, env)
    sh("git init -q && git add -A && git commit -qm copy", dest, env)
    return dest, env


def stages_run(output: str) -> list[str]:
    """Stage names of `Running stage '...'` lines of dvc repro's output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes under `root`, but the content manifests (.dvcignore: this checkout's mtimes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".manifest.json"))}


# ------------------------------------------------------------------------------- Prefect server

def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state held by `pid` or its descendants (Linux /proc)."""
    pids, children = {pid}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            pids.add(c)
            todo.append(c)
    inodes = set()
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:                  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def start_prefect_server(env: dict, log: Path, wait_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`prefect server start --port 0` on 127.0.0.1: the kernel picks a free port and the server
    holds it from the start (no bind-close-reuse race); the port is read from the server's own
    listening socket. Returns (process, API url) once /health answers; raises RuntimeError with the
    log's tail when it does not within wait_s."""
    senv = {**env, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    senv.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "0"],
                            env=senv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while True:
        for port in sorted(_listening_ports(proc.pid)):
            url = f"http://127.0.0.1:{port}/api"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_background(proc)
            raise RuntimeError(f"Prefect server did not start: {Path(log).read_text()[-3000:]}")
        time.sleep(0.5)


RETRY_STATUS = (429, 502, 503)     # as prefect.client.base.PrefectHttpxSyncClient retries them


class PrefectServer:
    """`prefect server start` on 127.0.0.1 (a port the kernel picks, start_prefect_server) with the env's PREFECT_HOME."""

    def __init__(self, env: dict, wait_s: float = 180):
        home = Path(env["PREFECT_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "server.log"
        self.proc, self.url = start_prefect_server({**env, "PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}, self.log, wait_s)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def env(self, env: dict) -> dict:
        return {**env, "PREFECT_API_URL": self.url}

    def api(self, method: str, path: str, body: dict | None = None, tries: int = 6):
        """JSON in, JSON out. Retries what Prefect's own client retries (RETRY_STATUS): the server
        answers 503 when SQLite is busy (its transaction rolled back), e.g. while a worker polls."""
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"})
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or "null")
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS or attempt == tries - 1:
                    raise
                print(f"[prefect api] {method} {path}: HTTP {e.code}, retry {attempt + 1}", file=sys.stderr)
                time.sleep(min(2 ** attempt, 10))

    def flow_runs(self, **flt) -> list[dict]:
        return self.api("POST", "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", **flt})

    def wait_run(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            fr = self.api("GET", f"/flow_runs/{run_id}")
            if fr["state"] and fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {run_id} not finished within {timeout} s: {fr['state']}")
            time.sleep(2)

    def artifact(self, key: str, flow_run_id: str | None = None) -> dict | None:
        flt = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
        if flow_run_id:
            flt["artifacts"]["flow_run_id"] = {"any_": [flow_run_id]}
        rows = self.api("POST", "/artifacts/filter", flt)
        return rows[0] if rows else None

    def stop(self) -> None:
        stop_background(self.proc)


def start_background(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_background(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
