"""`python -m flows.server ensure`: make sure a Prefect server answers at PREFECT_API_URL (default
http://127.0.0.1:4200/api), starting `prefect server start` in the background if none does, and
print the `export` lines for the shell. Workers on SLURM reach the same URL (the environment is
exported into their jobs)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:4200/api"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def ensure(url: str | None = None, wait_s: float = 90.0) -> str:
    url = url or os.environ.get("PREFECT_API_URL") or DEFAULT_URL
    if healthy(url):
        return url
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    log = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", port],
                     stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if healthy(url):
            return url
        time.sleep(1)
    raise RuntimeError(f"Prefect server did not answer at {url} within {wait_s:.0f} s; see {log}")


if __name__ == "__main__":
    if sys.argv[1:] != ["ensure"]:
        sys.exit("usage: python -m flows.server ensure")
    print(f"export PREFECT_API_URL={ensure()}")
