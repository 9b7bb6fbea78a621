"""`python -m flows.server ensure`: make sure a Prefect server answers at PREFECT_API_URL (default
http://127.0.0.1:4200/api), starting `prefect server start` in the background if none does, and
print the `export` lines for the shell. Workers on SLURM reach the same URL (the environment is
exported into their jobs).

`lmsys run` does the same before it imports Prefect (`api_for_run`): without a server, Prefect
would start a temporary one inside the run, which fails the run when it does not start within 20 s
(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) on a loaded machine, stays behind when the run
is killed, and is gone with the run's history. The server started here is persistent (its own
session: it outlives the command, and later runs reuse it; its pid is in $PREFECT_HOME/server.pid),
has telemetry off, and is waited for as long as it is starting: a loaded machine delays the start,
never fails it. This module imports no Prefect.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:4200/api"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
START_WAIT_S = 900.0          # a server that neither answers nor exits within this long is reported
SAY_EVERY_S = 30.0
OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}   # no telemetry (the machines are offline)


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


def _host_port(url: str) -> tuple[str, str]:
    netloc = url.split("//", 1)[1].split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    return (host, port) if host else (netloc, "80")


def ensure(url: str | None = None, wait_s: float = START_WAIT_S, say=lambda line: None) -> str:
    """The URL of a Prefect server that answers: `url` (default PREFECT_API_URL or DEFAULT_URL),
    starting one there when it is a local address and nothing answers. Waits while the server is
    starting (`say` is told every SAY_EVERY_S); raises RuntimeError when a started server exits
    without answering, when a remote URL does not answer, or after `wait_s`."""
    url = url or os.environ.get("PREFECT_API_URL") or DEFAULT_URL
    if healthy(url):
        return url
    host, port = _host_port(url)
    if host not in LOOPBACK:
        raise RuntimeError(f"no Prefect server answers at {url} (PREFECT_API_URL), and it is not a local address "
                           "to start one at: start it there, or unset PREFECT_API_URL for a local server")
    home = prefect_home()
    log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE}
    env.pop("PREFECT_API_URL", None)
    say(f"starting a Prefect server at {url} (log {log}; it keeps running for later runs)")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host.strip("[]"),
                                 "--port", port], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (home / "server.pid").write_text(f"{proc.pid}\n")
    t0 = last_said = time.monotonic()
    while not healthy(url):
        if proc.poll() is not None:
            if healthy(url):                        # another command's server took the port first: use it
                return url
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the Prefect server started at {url} exited ({proc.returncode}) without answering; "
                               f"{log} ends: {' | '.join(tail)}")
        waited = time.monotonic() - t0
        if waited > wait_s:
            raise RuntimeError(f"the Prefect server at {url} (pid {proc.pid}) did not answer within {wait_s:.0f} s; "
                               f"see {log}")
        if time.monotonic() - last_said >= SAY_EVERY_S:
            say(f"still waiting for the Prefect server at {url} to start ({waited:.0f} s; a loaded machine is slow)")
            last_said = time.monotonic()
        time.sleep(1)
    return url


def profile_api_url() -> str | None:
    """PREFECT_API_URL of the active Prefect profile ($PREFECT_PROFILES_PATH or $PREFECT_HOME/profiles.toml,
    profile $PREFECT_PROFILE or the file's `active`), read without importing Prefect."""
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or data.get("active")
    return (data.get("profiles", {}).get(name) or {}).get("PREFECT_API_URL") if name else None


def needs_server(runner: str) -> str:
    """The error of a runner whose worker processes would have no Prefect API to report to."""
    return (f"the {runner} runner needs a Prefect server its worker processes can reach: start one "
            "(`prefect server start --host <address they reach>`) and set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api); without it every process starts its own ephemeral API")


def api_for_run(say=lambda line: None, runner: str = "local") -> str:
    """Before `lmsys run` imports Prefect: the API it uses (PREFECT_API_URL, else the active
    profile's, else DEFAULT_URL), started when it is local and does not answer (ensure), set in
    this process's environment (so Prefect, the workers and SLURM jobs use it) with telemetry off.
    The slurm runner gets no default: its jobs may run on other nodes, which a server on this one's
    loopback does not reach, so the address is the user's to choose (ValueError when none is set)."""
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
    configured = os.environ.get("PREFECT_API_URL") or profile_api_url()
    if runner == "slurm" and not configured:
        raise ValueError(needs_server(runner))
    url = ensure(configured or DEFAULT_URL, say=say)
    os.environ["PREFECT_API_URL"] = url
    return url


if __name__ == "__main__":
    if sys.argv[1:] != ["ensure"]:
        sys.exit("usage: python -m flows.server ensure")
    print(f"export PREFECT_API_URL={ensure(say=lambda line: print(line, file=sys.stderr))}")
