"""The pipeline's steps: what one step is (`Step`) and what it returns (`StepResult`).

Every step is a plain function `run(cfg, layout, **keys) -> StepResult`, where `keys` are the
fan-out keys it takes (`fold=k`, `model=name`). It reads only the files `inputs(...)` names and
writes only the paths `outputs(...)` names, atomically. The ordered recipe table, with the recipe's
numbers, and the task graph are in lmsys.steps.recipe (imported explicitly: nothing registers by
being imported). The Prefect tasks (tasks/) and dvc.yaml (stages/) both wrap that table.

This module imports nothing of the project: it is in every step's code (lmsys.steps.code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class StepResult:
    outputs: list[Path]                        # files/dirs written
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    number: str                                # the recipe's step number ("1", "2.5", ...; "D1".. the data steps)
    name: str                                  # CLI subcommand and DVC stage name
    run: Callable[..., StepResult]             # run(cfg, layout, **keys)
    inputs: Callable[..., list[Path]]          # inputs(cfg, layout, **keys) -> files/dirs read
    outputs: Callable[..., list[Path]]         # outputs(cfg, layout, **keys) -> files/dirs written
    params: tuple[str, ...]                    # params.yaml keys (or sections) it reads
    fan_out: tuple[str, ...] = ()              # () | ("fold",) | ("model",) | ("model", "fold")
    gpu: bool = False                          # needs a GPU worker on the slurm runner
    data_parallel: bool = False                # may run as orchestration.step_gpus ranks (lmsys.distributed)
    also: tuple[str, ...] = ()                 # further recipe numbers this step carries out (predict: 8.5)
    cli: str | None = None                     # its command line (dvc.yaml's cmd); default `lmsys <name>`

    @property
    def command(self) -> str:
        """The command that runs the step alone (`lmsys train-teacher`; DVC stages run it)."""
        return self.cli or f"lmsys {self.name}"

    @property
    def module(self) -> str:
        """The module that holds the step's function: its code is that module's import closure."""
        return self.run.__module__
