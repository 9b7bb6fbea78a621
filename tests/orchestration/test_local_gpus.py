"""The local-gpus runner for real (issue 19 item 5): one machine, many GPUs, no SLURM. prefect-dask's
DaskTaskRunner over a distributed SpecCluster of Nanny workers, one per GPU (env CUDA_VISIBLE_DEVICES,
resource GPU=1) and per aligned group of a wider step width, plus CPU workers; reporting to the test
Prefect server. This machine has no GPU: four fake ones are given through the device list
(orchestration.local_gpus [0, 1, 2, 3]); nothing here needs CUDA, only the workers' environments."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from orch_config import SMALL

FOUR = {**SMALL, "orchestration.runner": "local-gpus", "orchestration.local_gpus": [0, 1, 2, 3],
        "orchestration.local_workers": 1, "orchestration.retry_delay_s": 1}


def _records(root: Path) -> dict[str, dict]:
    rec = json.loads((Path(root) / "artifacts" / "tiny" / "flow_run.json").read_text())["records"]
    return {r["task"]: r for r in rec}


def test_worker_layout_follows_the_devices_and_the_step_widths():
    """Four devices and no wider step: four one-GPU workers and the CPU workers. A step of width 2 adds
    the aligned pairs (the same groups `lmsys plan --runner local-gpus` schedules on)."""
    from flows.runners import local_gpu_workers
    from lmsys.config import load_config
    spec = local_gpu_workers(load_config("tiny", {**FOUR, "orchestration.local_workers": 2}))
    env = {name: (w["options"]["env"]["CUDA_VISIBLE_DEVICES"], w["options"]["resources"]) for name, w in spec.items()}
    assert env == {"gpu-0": ("0", {"GPU": 1}), "gpu-1": ("1", {"GPU": 1}), "gpu-2": ("2", {"GPU": 1}),
                   "gpu-3": ("3", {"GPU": 1}), "cpu-0": ("", {"CPU_JOB": 1}), "cpu-1": ("", {"CPU_JOB": 1})}
    assert {w["cls"] for w in spec.values()} == {"distributed.Nanny"} and all(w["options"]["nthreads"] == 1
                                                                              for w in spec.values())
    wide = local_gpu_workers(load_config("tiny", {**FOUR, "orchestration.step_gpus": {"distill": 2, "predict": 8}}))
    assert sorted(n for n in wide if n.startswith("gpu-")) == ["gpu-0", "gpu-0,1", "gpu-0,1,2,3", "gpu-1", "gpu-2",
                                                               "gpu-2,3", "gpu-3"]   # predict's 8 cut to the 4 there are
    with pytest.raises(ValueError, match="no GPU: orchestration.local_gpus is auto and torch sees no CUDA device"):
        local_gpu_workers(load_config("tiny", {**FOUR, "orchestration.local_gpus": "auto"}))


def test_the_cluster_starts_four_gpu_workers_each_seeing_its_own_device(prefect_server):
    """The runner's cluster, started by a flow: four GPU workers and one CPU worker; inside each worker
    process CUDA_VISIBLE_DEVICES is its own device (the CPU worker's is empty), and a task pinned to a
    worker as the pipeline pins GPU steps runs there and sees that device."""
    import dask
    from distributed import get_worker
    from prefect import flow, task
    from prefect.context import FlowRunContext

    from flows.runners import gpu_worker_name, make_task_runner
    from lmsys.config import load_config

    @task
    def where() -> tuple[str, str]:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), get_worker().name

    @flow(task_runner=make_task_runner(load_config("tiny", FOUR)))
    def probe():
        client = FlowRunContext.get().task_runner.client
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        seen = {names[a]: env for a, env in client.run(os.getenv, "CUDA_VISIBLE_DEVICES").items()}
        ran = {}
        for d in ("0", "1", "2", "3"):
            with dask.annotate(workers=[gpu_worker_name((d,))], allow_other_workers=False, resources={"GPU": 1}):
                ran[d] = where.submit()
        return seen, {d: f.result() for d, f in ran.items()}

    t0 = time.perf_counter()
    seen, ran = probe()
    print(f"\n[local-gpus] cluster up, probed and closed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    assert seen == {"gpu-0": "0", "gpu-1": "1", "gpu-2": "2", "gpu-3": "3", "cpu-0": ""}
    assert ran == {d: (d, f"gpu-{d}") for d in ("0", "1", "2", "3")}


@pytest.fixture(scope="module")
def local_gpus_run(pipeline_api, prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("local-gpus-root")
    t0 = time.perf_counter()
    # check=False: the flow's `lmsys check` would fail its local-gpus line here (no CUDA device 0..3)
    out = pipeline_api.run_pipeline(profile="tiny", overrides=FOUR, root=str(root), check=False)
    print(f"\n[local-gpus run] {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    return root, out, _records(root)


def test_gpu_steps_run_only_on_the_gpu_workers(local_gpus_run):
    """Every task says from inside where it ran: GPU steps on a GPU worker whose CUDA_VISIBLE_DEVICES is
    that worker's own device, CPU steps on the CPU worker with no device; GPU tasks that overlapped in
    time never shared a device."""
    from lmsys.config import load_config
    from lmsys.steps.recipe import STEPS, tasks_of
    _, out, rec = local_gpus_run
    assert out["runner"] == "local-gpus" and out["tasks"] == len(rec) == len(tasks_of(load_config("tiny", FOUR)))
    gpu = {t: r for t, r in rec.items() if STEPS[r["step"]].gpu}
    cpu = {t: r for t, r in rec.items() if t not in gpu}
    assert {"post-pretrain", "train-teacher", "teacher-logits", "distill", "ensemble", "predict"} <= {r["step"] for r in gpu.values()}
    for t, r in gpu.items():
        assert r["worker"] in {"gpu-0", "gpu-1", "gpu-2", "gpu-3"}, (t, r)
        assert r["cuda_visible_devices"] == r["worker"].removeprefix("gpu-"), (t, r)
    for t, r in cpu.items():
        assert (r["worker"], r["cuda_visible_devices"]) == ("cpu-0", ""), (t, r)
    assert len({r["pid"] for r in gpu.values()} & {r["pid"] for r in cpu.values()}) == 0     # other processes
    spans = sorted((r["started"], r["finished"], r["cuda_visible_devices"], t) for t, r in gpu.items())
    overlaps = [(a[3], b[3]) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    for a, b in overlaps:
        assert gpu[a]["cuda_visible_devices"] != gpu[b]["cuda_visible_devices"], (a, b)
    used = sorted({r["worker"] for r in gpu.values()})
    print(f"\n[local-gpus run] GPU workers used {used}; GPU tasks side by side: {overlaps}", file=sys.stderr)
    assert overlaps and len(used) >= 2                 # independent tasks (the two folds, ...) ran at once
    assert (Path(local_gpus_run[0]) / "reports" / "tiny" / "metrics.json").exists()
