"""A Dask worker preload for the scheduling test (tests/orchestration/test_slurm.py): it holds one task
back, so that the test can see its dependants wait for it while other tasks go on.

The test exports DASK_DISTRIBUTED__WORKER__PRELOAD naming this file and LMSYS_TEST_SLOW_TASK
("<task label>=<seconds>"); the SLURM worker jobs inherit both (sbatch exports the environment), and
each worker runs `dask_setup` when it starts: it wraps tasks.steps' step runner so that the named task
sleeps first. No production module knows about it.
"""
from __future__ import annotations

import os
import time

SLOW_TASK_ENV = "LMSYS_TEST_SLOW_TASK"


def dask_setup(worker) -> None:
    import tasks.steps
    from lmsys.steps.recipe import task_label
    label, _, seconds = os.environ.get(SLOW_TASK_ENV, "").partition("=")
    run = tasks.steps.run

    def held_back(name, cfg, layout, **keys):
        if task_label(name, keys) == label:
            time.sleep(float(seconds))
        return run(name, cfg, layout, **keys)

    tasks.steps.run = held_back
