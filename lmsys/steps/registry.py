"""Import every step module (so they register) and run steps by name."""
from __future__ import annotations

import importlib
import sys

from lmsys.paths import Layout
from lmsys.steps import STEPS, StepResult

# Pipeline order. A module that does not exist yet is a step still missing (reported by `lmsys run`).
STEP_MODULES = [
    "lmsys.steps.prepare",        # demo-data, prepare
    "lmsys.steps.folds",          # 2
    "lmsys.steps.teachers",       # 1, 2.5, 3, 4
    "lmsys.steps.student",        # 4.5, 5, 6, 7
    "lmsys.steps.serve",          # 8/8.5, 9
]
MISSING: list[str] = []
for _m in STEP_MODULES:
    try:
        importlib.import_module(_m)
    except ModuleNotFoundError as e:
        if e.name != _m:
            raise
        MISSING.append(_m)


def run_step(name: str, cfg: dict, layout: Layout, **keys) -> StepResult:
    """Run step `name`; on a GPU its metrics also get gpu_peak_gib (peak memory allocated by torch
    during the step; nothing is added on a CPU). Raises KeyError for an unknown step."""
    if name not in STEPS:
        raise KeyError(f"unknown step {name!r}; known: {list(STEPS)}")
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    result = STEPS[name].run(cfg, layout, **keys)
    cuda = cuda or _cuda()                     # torch may have been imported (and CUDA started) by the step
    if cuda is not None:
        result.metrics = {**result.metrics, "gpu_peak_gib": cuda.max_memory_allocated() / 2**30}
    return result


def _cuda():
    """torch.cuda when torch is already imported and CUDA is initialised, else None (no import here:
    listing or running CPU steps must not pay for torch)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None
