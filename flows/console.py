"""What `lmsys run` prints while the flow runs: one line per finished task (name, state, seconds)
and a progress line with an ETA; the same lines go to the flow run's log in the Prefect UI.

The ETA uses the seconds each task took in the previous run of the profile (flow_run.json), when
there is one, else the mean time of the tasks done so far. Prefect's own INFO lines and the steps'
progress bars stay off the console unless `lmsys run --verbose` (lmsys.console.quiet_console).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

def previous_seconds(flow_run_json: Path) -> dict[str, float]:
    """task label -> seconds it took in the previous run (empty when there was none)."""
    try:
        records = json.loads(flow_run_json.read_text())["records"]
    except (OSError, ValueError, KeyError):
        return {}
    return {r["task"]: float(r.get("seconds") or 0.0) for r in records if r.get("state") != "Cached"}


class Progress:
    """Counts finished tasks of a run of `labels` and prints their lines and the progress line."""

    def __init__(self, labels: list[str], expected: dict[str, float], logger=None, stream=None):
        self.labels, self.expected, self.logger = labels, expected, logger
        self.stream = stream or sys.stdout
        self.done: set[str] = set()
        self.t0 = time.perf_counter()

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.logger is not None:
            self.logger.info(line)

    def task_done(self, label: str, state: str, seconds: float | None) -> None:
        self.done.add(label)
        self._say(f"  {label:<36} {state:<10} {seconds or 0.0:7.1f} s")

    def eta_s(self) -> float:
        left = [t for t in self.labels if t not in self.done]
        if all(t in self.expected for t in left):
            return sum(self.expected[t] for t in left)
        elapsed = time.perf_counter() - self.t0
        return elapsed / max(len(self.done), 1) * len(left)

    def report(self) -> None:
        n, k = len(self.labels), len(self.done)
        elapsed = time.perf_counter() - self.t0
        eta = "" if k == n else f", ETA {self.eta_s():.0f} s"
        self._say(f"[{k}/{n} tasks, {100 * k / n:.0f}%] {elapsed:.0f} s elapsed{eta}")
