"""The slurm runner for real: prefect-dask's DaskTaskRunner over a dask-jobqueue SLURMCluster on the
single-node SLURM of start_slurm.sh (fake GPU GRES gpu:2), reporting to the test Prefect server.

  slurm_run        the small pipeline on two 1-GPU jobs (undisturbed but for fold 1's teacher, held back
                   SLOW_S seconds by a Dask worker preload, tests/orchestration/slow_task.py; also the reference)
  slurm_fault_run  a copy of that root without the fold-0 teacher: the flow retrains it, and the
                   test scancels the job running it as soon as its first checkpoint exists; Dask
                   reruns the task on another job and the trainer resumes from <out>.partial/checkpoint
"""
from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from orch_config import ROUTING, SLURM
from pinned import unavailable


SLOW = "train-teacher-fold1-modelllama"          # held back in slurm_run (tests/orchestration/slow_task.py)
SLOW_S = 30


def _code_hashes() -> dict[str, str]:
    from lmsys.steps.recipe import STEPS
    from tasks.steps import code_hash
    return {n: code_hash(s) for n, s in STEPS.items()}


def _n_tasks(overrides: dict) -> int:
    """Tasks of the flow for these overrides (the plan the flow runs)."""
    from lmsys.config import load_config
    from lmsys.steps.recipe import tasks_of
    return len(tasks_of(load_config("tiny", overrides)))


def _records(root: Path) -> dict[str, dict]:
    rec = json.loads((Path(root) / "artifacts" / "tiny" / "flow_run.json").read_text())["records"]
    return {r["task"]: r for r in rec}


@pytest.fixture(scope="session")
def slurm_run(slurm, pipeline_api, tmp_path_factory):
    from slow_task import SLOW_TASK_ENV
    root = tmp_path_factory.mktemp("slurm-root")
    code = _code_hashes()
    t0 = time.perf_counter()
    # the flow as a deployment starts it (the decorator's thread runner): it reruns itself as a subflow on
    # the SLURM Dask runner; the fault run below goes through run_pipeline, which picks that runner at once.
    # The worker jobs inherit this environment (sbatch exports it): each worker preloads slow_task.py,
    # which holds fold 1's teacher back SLOW_S seconds.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", json.dumps([str(Path(__file__).with_name("slow_task.py"))]))
        mp.setenv(SLOW_TASK_ENV, f"{SLOW}={SLOW_S}")
        out = pipeline_api.pipeline(profile="tiny", overrides=SLURM, root=str(root))
    print(f"\n[slurm run] {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    return root, out, _records(root), code


@pytest.fixture(scope="session")
def slurm_fault_run(slurm_run, pipeline_api, tmp_path_factory):
    ref_root = slurm_run[0]
    root = tmp_path_factory.mktemp("slurm-fault-root") / "run"
    shutil.copytree(ref_root, root, ignore=shutil.ignore_patterns("slurm-logs"))
    shutil.rmtree(root / "artifacts" / "tiny" / "teachers" / "llama" / "fold0")
    box: dict = {}

    def flow():
        try:
            box["out"] = pipeline_api.run_pipeline(profile="tiny", runner="slurm", overrides=SLURM, root=str(root))
        except BaseException as e:                     # noqa: BLE001  (re-raised in the test thread)
            box["error"] = e

    # the flow thread keeps this thread's Prefect settings (the test server), held in contextvars
    th = threading.Thread(target=contextvars.copy_context().run, args=(flow,), daemon=True)
    t0 = time.perf_counter()
    th.start()
    art = root / "artifacts" / "tiny"
    deadline = time.monotonic() + 400
    ckpt = task = marker = None
    while th.is_alive() and time.monotonic() < deadline:
        for found in sorted(art.glob("teachers/*/fold*.partial/checkpoint")):   # <out>.partial/checkpoint
            model, fold = found.parent.parent.name, found.parent.name.removesuffix(".partial")
            task = f"train-teacher-{fold}-model{model}"
            marker = art / ".running" / f"{task}.json"            # where that task runs (tasks.steps)
            if marker.exists():
                ckpt = found
                break
        if ckpt:
            break
        time.sleep(0.05)
    assert ckpt is not None, f"no training checkpoint appeared under {art} ({box.get('error')!r})"
    where = json.loads(marker.read_text())
    job = where["slurm_job_id"]
    assert job, where
    r = subprocess.run(["scancel", str(job)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    cancelled_at = time.time()
    print(f"\n[slurm fault] scancel job {job} at {ckpt} (task started on {where['host']} pid {where['pid']})", file=sys.stderr)
    th.join(timeout=540)
    assert not th.is_alive(), "the flow did not finish within 9 min of the scancel"
    if "error" in box:
        raise box["error"]
    print(f"\n[slurm fault run] {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    return root, box["out"], _records(root), {"job": str(job), "task": task, "checkpoint": ckpt,
                                              "cancelled_at": cancelled_at, "code": _code_hashes()}


# ---------------------------------------------------------------- fail fast, no SLURM job needed

def test_job_script_python_interface_logs_and_api_url(pipeline_api, prefect_server, tmp_path):
    from dask_jobqueue import SLURMCluster

    from flows.runners import slurm_cluster_kwargs
    from lmsys.config import load_config
    cfg = load_config("tiny", SLURM)
    cfg["root"] = str(tmp_path)
    kw = slurm_cluster_kwargs(cfg)
    with SLURMCluster(**kw) as cluster:
        script = cluster.job_script()
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script          # the venv's python
    assert "--interface lo" in script and "--resources GPU=1" in script
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert f"#SBATCH -e {tmp_path}/artifacts/tiny/slurm-logs/" in script         # logs in the run root
    assert f"export PREFECT_API_URL={prefect_server}" in script


def test_gpus_per_job_zero_fails_before_submitting(pipeline_api, slurm, tmp_path):
    with pytest.raises(ValueError, match=r"gpus_per_job=0: no SLURM worker would offer a GPU"):
        pipeline_api.run_pipeline(profile="tiny", runner="slurm", root=str(tmp_path),
                                  overrides={**SLURM, "orchestration.slurm.gpus_per_job": 0})
    assert not (tmp_path / "artifacts" / "tiny" / "slurm-logs").exists()           # no cluster was started
    assert not (tmp_path / "data").exists()                                        # no task ran


def test_no_worker_within_worker_wait_fails_clearly(pipeline_api, slurm, tmp_path):
    over = {**SLURM, "orchestration.slurm.gpus_per_job": 3,     # the node has gpu:2: sbatch refuses every job
            "orchestration.slurm.min_jobs": 0, "orchestration.slurm.worker_wait_s": 5}
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"no SLURM worker joined within 5 s \(orchestration.slurm.worker_wait_s\)") as e:
        # check=False: the flow's `lmsys check` would stop it first (its GRES line); this tests the watchdog
        pipeline_api.run_pipeline(profile="tiny", runner="slurm", root=str(tmp_path), overrides=over, check=False)
    assert "demo-data" in str(e.value) and "gpus_per_job=3" in str(e.value)
    assert "sbatch --test-only says" in str(e.value) or "SLURM jobs: " in str(e.value)
    print(f"\n[no worker] {time.perf_counter() - t0:.1f} s: {e.value}", file=sys.stderr)
    assert time.perf_counter() - t0 < 120


def test_slurm_runner_without_prefect_api_url_fails(pipeline_api, monkeypatch, capsys, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from lmsys.cli import EXIT_INPUT, main
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        code = main(["run", "--runner", "slurm", "--profile", "tiny"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT, err
    assert re.fullmatch(r"error: the slurm runner needs a Prefect server.*PREFECT_API_URL.*\n", err), err
    assert not (tmp_path / "data").exists()                                        # no task ran


# ---------------------------------------------------------------- the undisturbed SLURM run

def test_gpu_steps_run_inside_slurm_jobs(slurm_run):
    from tasks.steps import STEPS
    _, out, rec, _ = slurm_run
    assert out["runner"] == "slurm" and out["tasks"] == len(rec) == _n_tasks(SLURM) and out["cached"] == 0
    gpu = {t: r for t, r in rec.items() if STEPS[r["step"]].gpu}
    assert {"post-pretrain", "train-teacher", "teacher-logits", "distill", "ensemble", "predict"} <= {r["step"] for r in gpu.values()}
    for t, r in gpu.items():
        assert r["slurm_job_id"] and r["slurm_job_id"].isdigit(), (t, r)
        assert r["host"], (t, r)
    # CPU steps run on the same workers (every worker here is a GPU job), so they have a job too
    cpu_jobs = {t: r["slurm_job_id"] for t, r in rec.items() if t not in gpu}
    print(f"\n[slurm run] CPU steps ran in jobs {cpu_jobs}", file=sys.stderr)
    assert len({r["slurm_job_id"] for r in rec.values()}) >= 2


def test_two_folds_run_at_the_same_time_on_two_jobs(slurm_run):
    _, _, rec, _ = slurm_run
    pairs = []
    for step in ("train-teacher", "distill"):
        a, b = sorted((r for r in rec.values() if r["step"] == step), key=lambda r: r["task"])
        overlap = min(a["finished"], b["finished"]) - max(a["started"], b["started"])
        pairs.append((step, a["slurm_job_id"], b["slurm_job_id"], round(overlap, 1)))
        assert a["finished"] - a["started"] == pytest.approx(a["seconds"], abs=1.0)
    print(f"\n[slurm run] fold pairs (step, job, job, overlap s): {pairs}", file=sys.stderr)
    assert any(ja != jb and overlap > 0 for _, ja, jb, overlap in pairs), pairs


def test_a_slow_fold_does_not_delay_another_folds_next_step(slurm_run):
    """Fold 1's teacher is held back SLOW_S s; fold 0's teacher logits read only fold 0's teacher, so
    they start (on the other job) before fold 1's teacher finishes. A flow that ran level by level
    would start no teacher-logits task before every train-teacher task had finished."""
    _, _, rec, _ = slurm_run
    slow, fast = rec[SLOW], rec["teacher-logits-fold0-modelllama"]
    assert slow["seconds"] >= SLOW_S, slow
    print(f"\n[slurm run] {fast['task']} started {slow['finished'] - fast['started']:.1f} s before {SLOW} "
          f"finished (jobs {fast['slurm_job_id']}, {slow['slurm_job_id']})", file=sys.stderr)
    assert fast["started"] < slow["finished"] - 5, (fast, slow)


def test_worker_tasks_report_to_the_test_server(slurm_run, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    _, out, rec, _ = slurm_run
    run_id = uuid.UUID(out["flow_run_id"])
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_server.rstrip("/")
        assert client.read_flow_run(run_id).state.is_completed()
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    done = {r.name.rsplit("-", 1)[0] for r in runs if r.state and r.state.is_completed()}
    assert set(rec) <= done, sorted(set(rec) - done)


# ---------------------------------------------------------------- one GPU job and one CPU-only job

def _job_gres(job: str) -> str:
    """The GPU request SLURM recorded for a job (`scontrol show job`: TresPerNode), '' for none."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True)
    m = re.search(r"TresPerNode=(\S+)", r.stdout)
    return m.group(1) if m else ""


@pytest.fixture(scope="session")
def slurm_routing_run(slurm, pipeline_api, tmp_path_factory):
    """The small pipeline on one 1-GPU job and one CPU-only job. Every job that ran is found by its
    worker log (<job name>-<job id>.err); its GPU request is read back from SLURM right after the
    run (scontrol keeps finished jobs for MinJobAge, 300 s by default)."""
    root = tmp_path_factory.mktemp("slurm-routing-root")
    t0 = time.perf_counter()
    out = pipeline_api.run_pipeline(profile="tiny", runner="slurm", overrides=ROUTING, root=str(root))
    logs = {p.stem.rsplit("-", 1)[1]: p.read_text(errors="replace")
            for p in (root / "artifacts" / "tiny" / "slurm-logs").glob("*.err")}
    gres = {job: _job_gres(job) for job in logs}
    print(f"\n[slurm routing] {time.perf_counter() - t0:.1f} s wall; jobs and GPU requests {gres}", file=sys.stderr)
    return out, _records(root), gres, logs


def test_gpu_steps_never_run_on_the_cpu_only_worker(slurm_routing_run):
    from tasks.steps import STEPS
    out, rec, gres, logs = slurm_routing_run
    assert out["cached"] == 0 and {r["state"] for r in rec.values()} == {"Completed"}, rec
    gpu_jobs = {j for j, g in gres.items() if "gpu" in g}
    cpu_jobs = set(gres) - gpu_jobs
    assert len(gpu_jobs) >= 1 and len(cpu_jobs) == 1, gres
    # the CPU-only worker joined the cluster (else nothing could have been routed away from it)
    assert all("Registered to" in logs[j] for j in cpu_jobs), {j: logs[j][-2000:] for j in cpu_jobs}
    ran_on = {t: r["slurm_job_id"] for t, r in rec.items()}                  # observed in the task process
    assert set(ran_on.values()) <= set(gres), (ran_on, gres)
    wrong = {t: j for t, j in ran_on.items() if STEPS[rec[t]["step"]].gpu and j not in gpu_jobs}
    assert wrong == {}, (wrong, gres)                                        # a GPU step on the CPU-only job
    print(f"\n[slurm routing] CPU steps on the CPU-only job: {sorted(t for t, j in ran_on.items() if j in cpu_jobs)}",
          file=sys.stderr)


# ---------------------------------------------------------------- a worker job cancelled mid-training

def test_scancel_mid_training_resumes_and_matches_the_undisturbed_run(slurm_run, slurm_fault_run):
    ref_root, _, _, code_before = slurm_run
    root, out, rec, fault = slurm_fault_run
    assert out["tasks"] == _n_tasks(SLURM)
    r = rec[fault["task"]]
    assert r["state"] == "Completed" and r["slurm_job_id"] != fault["job"], r          # finished on another job
    teacher = fault["checkpoint"].parent.with_name(fault["checkpoint"].parent.name.removesuffix(".partial"))
    teacher = teacher.relative_to(root)                                                # artifacts/tiny/teachers/llama/fold<k>
    metrics = json.loads((root / teacher / "metrics.json").read_text())
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] > 0, metrics   # resumed, not restarted
    assert not (root / teacher).with_name(teacher.name + ".partial").exists()
    ref_adapter = sorted(p.relative_to(ref_root / teacher) for p in (ref_root / teacher / "adapter").rglob("*") if p.is_file())
    assert ref_adapter
    for rel in ref_adapter:                                       # the published adapter, byte for byte
        assert (root / teacher / rel).read_bytes() == (ref_root / teacher / rel).read_bytes(), rel
    fold = teacher.name
    logits = Path(f"artifacts/tiny/logits/llama/{fold}.parquet")
    assert rec[f"teacher-logits-{fold}-modelllama"]["state"] != "Cached"     # its input dir changed (metrics.json)
    assert (root / logits).read_bytes() == (ref_root / logits).read_bytes()
    sub = Path("artifacts/tiny/predictions/submission.csv")
    assert (root / sub).read_bytes() == (ref_root / sub).read_bytes() and os.path.getsize(root / sub) > 0
    # same logits -> same keys downstream: the student side is a cache hit. Only if no step's code
    # changed between the two runs (an edit of the working tree meanwhile): that is not a pass
    changed = sorted(n for n in code_before if code_before[n] != fault["code"].get(n))
    if changed:
        unavailable(f"lmsys code of {changed} changed between the reference and the fault run: "
                    "the downstream cache hits cannot be checked")
    assert all(rec[t]["state"] == "Cached" for t in ("calibrate-modelllama", "distill-fold0", "distill-fold1",
                                                     "ensemble", "predict")), rec


# ---------------------------------------------------------------- a rerun with nothing changed

def _slurm_jobs() -> dict[str, str]:
    """Id -> name of the jobs slurmctld knows: pending, running, and finished within MinJobAge (300 s by default)."""
    r = subprocess.run(["scontrol", "-o", "show", "jobs"], capture_output=True, text=True, check=False)
    return dict(re.findall(r"JobId=(\d+) JobName=(\S+)", r.stdout))


def test_an_unchanged_rerun_starts_no_slurm_job(slurm_run, pipeline_api):
    """The flow predicts every task's cache hit (its key from the inputs' manifests, the outputs carrying
    that key, Prefect's result record) and runs the hits in its own process: with adaptive jobs
    (min_jobs 0) nothing reaches the cluster, so no worker job and no check job is submitted."""
    root = slurm_run[0]
    before = _slurm_jobs()
    t0 = time.perf_counter()
    out = pipeline_api.run_pipeline(profile="tiny", runner="slurm", root=str(root),
                                    overrides={**SLURM, "orchestration.slurm.min_jobs": 0})
    new = {i: name for i, name in _slurm_jobs().items() if i not in before}
    print(f"\n[slurm rerun] {time.perf_counter() - t0:.1f} s wall, {out['cached']}/{out['tasks']} cached, "
          f"new jobs {sorted(new)}", file=sys.stderr)
    assert out["tasks"] == out["cached"] == _n_tasks(SLURM)
    assert new == {}, new
    rec = _records(root)
    assert {r["state"] for r in rec.values()} == {"Cached"}
