"""A preflight check's result (`Check`: ok / warn / FAIL / skip, with a fix) and the table of them
(`lmsys check` prints it; the flow publishes it as the `lmsys-check` artifact). The checks themselves:
lmsys/check.py (models, data, forward passes, disk) and lmsys/check_slurm.py (the cluster)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass
class Check:
    check: str            # what was checked, e.g. "model llama: head"
    status: str           # ok | warn | FAIL | skip
    detail: str = ""
    fix: str = ""         # what to do, for warn and FAIL

def exit_code(checks: list[Check]) -> int:
    """2 when a check failed, 1 with warnings only, else 0."""
    statuses = {c.status for c in checks}
    return 2 if FAIL in statuses else 1 if WARN in statuses else 0

def format_table(checks: list[Check]) -> str:
    """Plain-text table: status, check, detail; a `fix:` line under every warn and FAIL."""
    width = max((len(c.check) for c in checks), default=10)
    out = []
    for c in checks:
        out.append(f"{c.status:<4}  {c.check:<{width}}  {c.detail}")
        if c.fix and c.status in (WARN, FAIL):
            out.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    return "\n".join(out)


def summary(checks: list[Check]) -> str:
    n = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL, SKIP)}
    return f"{n[OK]} passed, {n[WARN]} warning(s), {n[FAIL]} failed, {n[SKIP]} skipped"


def table_rows(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


def failures(checks: list[Check]) -> list[str]:
    return [f"{c.check}: {c.detail}" for c in checks if c.status == FAIL]


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


