"""`lmsys check` run in-process for the tests (tests/test_check.py, tests/orchestration/test_check_flow.py)."""
from __future__ import annotations

import re
import sys
import time


def run_check(capsys, *args) -> tuple[int, str, dict[str, str]]:
    """Run `lmsys check ARGS`; (exit code, stdout, {check name: status}) from its table."""
    from lmsys.cli import main
    t0 = time.perf_counter()
    code = main(["check", *args])
    out = capsys.readouterr().out
    print(f"\n[lmsys check {' '.join(args)[-120:]}] exit {code} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(ok|warn|FAIL|skip)\s+(\S.*?)\s{2,}", line)
        if m:
            rows[m.group(2)] = m.group(1)
    return code, out, rows
