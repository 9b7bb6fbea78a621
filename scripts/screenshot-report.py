#!/usr/bin/env python
"""Look at the last run's report as a user does: a headless Chromium screenshot of the newest
`lmsys-report` artifact page in the Prefect UI.

    python scripts/screenshot-report.py [OUT.png]     (default: reports/<profile>/report-ui.png of the run)

Needs a Prefect server at PREFECT_API_URL (default http://127.0.0.1:4200/api) and Debian's `chromium`
(`apt-get install chromium`). Exits 2 when either is missing or no report artifact exists.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request


def newest_report_artifact(api: str) -> dict | None:
    body = json.dumps({"artifacts": {"key": {"any_": ["lmsys-report"]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api}/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        rows = json.loads(r.read())
    return rows[0] if rows else None


def main(argv: list[str]) -> int:
    api = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api").rstrip("/")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    try:
        art = newest_report_artifact(api)
    except OSError as e:
        print(f"error: no Prefect server at {api}: {e}", file=sys.stderr)
        return 2
    if art is None:
        print(f"error: no lmsys-report artifact on {api}: run the pipeline first", file=sys.stderr)
        return 2
    out = argv[0] if argv else "report-ui.png"
    page = f"{api.removesuffix('/api')}/artifacts/artifact/{art['id']}"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2400", "--virtual-time-budget=40000", f"--screenshot={out}", page],
                   check=True, capture_output=True, timeout=120)
    print(f"{page} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
