"""The console of every `lmsys` command: the stack's known noise filtered, errors never.

`lmsys run` and `lmsys ablate` call quiet_console() unless --verbose (their progress is one line per task,
flows/console.py); the step commands (`lmsys train-teacher ...`, which `dvc repro` runs) call it with
progress bars kept where stderr is a terminal, unless -v/--verbose.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

# Known noise of the stack on every run, each checked to be harmless. Only these loggers' warnings
# are dropped (their errors still show), and only on the console of `lmsys run` without --verbose.
NOISY_LOGGERS = (
    "torchao",                         # CUDA-only kernels (.so) that a CPU build cannot load, no triton
    "torch.utils._pytree",             # torchao's Enum registration, deprecated in torch 2.13
    "bitsandbytes.backends.cpu.ops",   # the optional `kernels` package for the CPU 4-bit path
)
KNOWN_WARNINGS = (r".*`torch_dtype` is deprecated.*",                 # transformers 5 renamed it `dtype`
                  r".*`is_gradient_checkpointing` is deprecated.*")   # peft asks transformers 5 the old name


def quiet_console(progress_bars: bool = False) -> None:
    """Before torch, transformers or Prefect are imported: known noise is filtered (its errors still
    show), Prefect's console handler shows warnings and errors only (INFO still reaches the UI), and
    the steps' progress bars are off unless `progress_bars` (tqdm reads TQDM_DISABLE)."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    if not progress_bars:
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
        with contextlib.redirect_stdout(io.StringIO()):   # logbar prints an empty line when imported
            from logbar import LogBar
    except ImportError:                             # gptqmodel (and its logbar) not installed: no banner
        return
    LogBar.shared().setLevel(logging.WARNING)
