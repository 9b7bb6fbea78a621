"""Step registry: the single source of the pipeline graph.

Every step is a plain function `run(cfg, layout, **keys) -> StepResult`, where `keys` are the
fan-out keys it takes (`fold=k`, `model=name`). It reads only the files `inputs(...)` names and
writes only the paths `outputs(...)` names, atomically. The Prefect tasks (cache key = input
file hashes + `params` sections + code hash) and `dvc.yaml` (deps/params/outs) are both derived
from this registry, so the two orchestrators cannot drift.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


# Modules every step runs besides its own: part of every step's code (cache key, DVC deps).
BASE_MODULES = ("lmsys.steps", "lmsys.io", "lmsys.paths", "lmsys.config")


@dataclass
class StepResult:
    outputs: list[Path]                        # files/dirs written
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    name: str                                  # CLI subcommand and DVC stage name
    number: str                                # the recipe's step number ("1", "2.5", ...)
    run: Callable[..., StepResult]             # run(cfg, layout, **keys)
    inputs: Callable[..., list[Path]]          # inputs(cfg, layout, **keys) -> files/dirs read
    outputs: Callable[..., list[Path]]         # outputs(cfg, layout, **keys) -> files/dirs written
    params: tuple[str, ...]                    # params.yaml sections it reads
    fan_out: tuple[str, ...] = ()              # () | ("fold",) | ("model",) | ("model", "fold")
    gpu: bool = False                          # needs a GPU worker on the slurm runner
    modules: tuple[str, ...] = ()              # lmsys modules whose source goes into the code hash

    def code_modules(self) -> list[str]:
        """Every module whose source is this step's code: its own and BASE_MODULES, sorted."""
        return sorted({*self.modules, *BASE_MODULES})


STEPS: dict[str, Step] = {}


def register(step: Step) -> Step:
    if step.name in STEPS:
        raise ValueError(f"step {step.name!r} registered twice")
    STEPS[step.name] = step
    return step
