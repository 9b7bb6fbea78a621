"""A Dask worker preload for the scheduling test (tests/orchestration/test_slurm.py): it holds one task
back, so that the test can see its dependants wait for it while other tasks go on.

The test exports DASK_DISTRIBUTED__WORKER__PRELOAD naming this file and LMSYS_TEST_SLOW_TASK
("<task label>=<seconds>"); the SLURM worker jobs inherit both (sbatch exports the environment), and
each worker runs `dask_setup` when it starts: it wraps the library's step runner so that the named task
sleeps first. No production module knows about it.
"""
from __future__ import annotations

import os
import time

SLOW_TASK_ENV = "LMSYS_TEST_SLOW_TASK"


def dask_setup(worker) -> None:
    """Wraps lmsys.steps.recipe.run_step, the attribute the task's code finds in the worker: Prefect's task
    body (tasks.steps.run_step) reaches the worker pickled by value (its module name is taken by the
    Task object), and cloudpickle refers to the functions it calls by module and name, looked up when the
    worker unpickles it, after this preload."""
    from lmsys.steps import recipe
    label, _, seconds = os.environ.get(SLOW_TASK_ENV, "").partition("=")
    run = recipe.run_step

    def held_back(name, cfg, layout, **keys):
        if recipe.task_label(name, keys) == label:
            time.sleep(float(seconds))
        return run(name, cfg, layout, **keys)

    recipe.run_step = held_back
