"""Import every step module (so they register) and run steps by name."""
from __future__ import annotations

import importlib

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
    if name not in STEPS:
        raise KeyError(f"unknown step {name!r}; known: {list(STEPS)}")
    return STEPS[name].run(cfg, layout, **keys)
