"""What `lmsys run` prints while the flow runs: one line per finished task (name, state, seconds)
and a progress line with an ETA; the same lines go to the flow run's log in the Prefect UI.

The ETA uses the seconds each task took in the previous run of the profile (flow_run.json), when
there is one, else the mean time of the tasks done so far. Prefect's own INFO lines and the steps'
progress bars stay off the console unless `lmsys run --verbose` (see `quiet_console`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Known noise of the stack on every run, each checked to be harmless. Only these loggers' warnings
# are dropped (their errors still show), and only on the console of `lmsys run` without --verbose.
NOISY_LOGGERS = (
    "torchao",                         # CUDA-only kernels (.so) that a CPU build cannot load, no triton
    "torch.utils._pytree",             # torchao's Enum registration, deprecated in torch 2.13
    "bitsandbytes.backends.cpu.ops",   # the optional `kernels` package for the CPU 4-bit path
)
KNOWN_WARNINGS = (r".*`torch_dtype` is deprecated.*",                 # transformers 5 renamed it `dtype`
                  r".*`is_gradient_checkpointing` is deprecated.*")   # peft asks transformers 5 the old name


def quiet_console() -> None:
    """Before Prefect is imported: its console handler shows warnings and errors only (INFO still
    reaches the UI), step progress bars are off (tqdm reads TQDM_DISABLE), known noise is filtered."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:   # the CLI's own handler: Prefect's INFO records propagate to it
        handler.setLevel(logging.WARNING)
    quiet_gptqmodel_banner()


def quiet_gptqmodel_banner() -> None:
    """gptqmodel prints a ~20-line start-up banner (logo, versions, the env vars it sets) at INFO, and
    a free-threading advice at WARN, in every process that imports it (peft imports it when it builds
    LoRA layers, so every worker). Its logger is LogBar's process-wide `logbar`, which sets itself to
    INFO when first created: create it now and raise it to WARNING, so gptqmodel's warnings and errors
    still show; the GIL advice has its own switch (this project runs with the GIL: nothing to act on)."""
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    try:
        from logbar import LogBar
    except ImportError:                             # gptqmodel (and its logbar) not installed: no banner
        return
    LogBar.shared().setLevel(logging.WARNING)


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
