"""`lmsys plan`: the task graph before anything runs, each task with its SLURM job, timeout,
estimated wall time and GPU-hours from params.yaml's throughput figures, and the critical path on N GPUs."""
from __future__ import annotations

import re

import pytest

from lmsys.cli import main
from lmsys.config import load_config
from lmsys.plan import estimate, job_template, step_timeout, walltime_s
from lmsys.steps.recipe import STEPS, tasks_of, task_label


def test_plan_full_on_8_gpus_prints_every_task_with_resources_and_estimates(capsys):
    assert main(["plan", "--profile", "full", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("full")
    lines = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s+\d+\s", line)}
    tasks = [task_label(n, k) for n, k in tasks_of(cfg)]
    assert sorted(lines) == sorted(tasks) and len(tasks) >= 40
    for n, k in tasks_of(cfg):
        line = lines[task_label(n, k)]
        if STEPS[n].gpu:
            assert "gpu gres=gpu:1 mem=128GB cores=16 wall=7-00:00:00" in line, line
        else:
            assert "cpu cpu mem=32GB cores=4 wall=12:00:00" in line, line
        assert re.search(r"\d+(\.\d+)? (s|min|h|d) +\d+ +\d+(\.\d+)? (s|min|h|d) +\d+\.\d\d", line), line  # timeout samples wall GPU-h
    assert "throughput figures measured on: NVIDIA H200" in out
    assert re.search(r"total: \d+\.\d GPU-hours; wall time on 8 GPU\(s\), level by level: [\d.]+ d", out)
    assert "critical path (longest task of each level): " in out and "train-teacher-fold0-modelqwen" in out
    assert "GPU-hours by step: train-teacher" in out                   # where the GPU-hours go


def test_estimate_arithmetic_and_scheduling():
    cfg = load_config("full")
    e1, e8 = estimate(cfg, 1), estimate(cfg, 8)
    by = {t.task: t for t in e8["tasks"]}
    # one fold's teacher logits: its training rows and validation rows, both orders
    comp, ext = 57477, 21187
    assert by["teacher-logits-fold0-modelllama"].samples == pytest.approx(2 * (comp * 4 / 5 + ext) + 2 * comp / 5)
    assert by["teacher-logits-fold0-modelllama"].seconds == pytest.approx(900 + by["teacher-logits-fold0-modelllama"].samples / 2.8)
    assert by["filter-score-modelllama"].samples == comp + ext                          # once, every row
    assert by["prepare"].gpu_hours == 0 and by["prepare"].job["gpus"] == 0
    assert e1["gpu_hours"] == pytest.approx(e8["gpu_hours"]) and e1["wall_s"] > e8["wall_s"]
    gpu_s = sum(t.seconds for t in e1["tasks"] if t.gpu)
    assert e1["wall_s"] >= gpu_s                                         # one GPU runs every GPU task in turn
    # with a GPU per task, each level lasts as long as its longest task: the critical path
    wide = estimate(cfg, 100)
    assert wide["wall_s"] == pytest.approx(sum(by[t].seconds for t in wide["critical_path"]))
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        estimate(cfg, 0)


def test_job_templates_and_timeouts():
    tiny, full = load_config("tiny"), load_config("full")
    assert job_template(tiny, gpu=False) == {**job_template(tiny, gpu=True), "gpus": 0}   # null -> the GPU template
    assert job_template(full, gpu=False) == {"queue": "cpu", "walltime": "12:00:00", "memory": "32GB", "cores": 4, "gpus": 0}
    assert step_timeout(full, "train-teacher") == 1152000 and step_timeout(tiny, "train-teacher") == 7200
    assert walltime_s("7-00:00:00") == 7 * 86400 and walltime_s("02:00:00") == 7200
    with pytest.raises(ValueError):
        walltime_s("2h")


def test_plan_errors_are_one_line(capsys):
    assert main(["plan", "--profile", "tiny", "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_full_profile_slurm_job_scripts_gpu_and_cpu_templates():
    """The sbatch scripts dask-jobqueue writes for the full profile: GPU jobs on the GPU template with
    --gres=gpu:1 and the GPU worker resource; the CPU-only job on the CPU template (partition, memory,
    cores, walltime), no --gres, offering the CPU_JOB resource that CPU steps ask for."""
    from dask_jobqueue.slurm import SLURMJob

    from flows.runners import cpu_job_template, slurm_cluster_kwargs
    from flows.slurm_cpu import cpu_job_options
    cfg = load_config("full")
    kw = {k: v for k, v in slurm_cluster_kwargs(cfg).items()
          if k not in ("log_directory", "scheduler_options", "interface")}
    gpu = SLURMJob(scheduler="tcp://127.0.0.1:8786", name="gpu-0", **kw).job_script()
    cpu = SLURMJob(scheduler="tcp://127.0.0.1:8786", name="cpu-0", **cpu_job_options(kw, cpu_job_template(cfg))).job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 7-00:00:00", "#SBATCH --cpus-per-task=16"):
        assert line in gpu, gpu
    assert "--resources GPU=1" in gpu and "CPU_JOB" not in gpu
    for line in ("#SBATCH -p cpu", "#SBATCH -t 12:00:00", "#SBATCH --cpus-per-task=4"):
        assert line in cpu, cpu
    assert "--gres" not in cpu and "GPU=1" not in cpu and "--resources CPU_JOB=1" in cpu
    assert re.search(r"#SBATCH --mem=(29|30|32)G", cpu) and re.search(r"#SBATCH --mem=1(19|20|28)G", gpu)


def test_models_without_figures_are_shown_unknown_not_fatal(capsys):
    """The small profile's models have no figures in orchestration.estimate: their tasks print '?' and
    are left out of the totals, which the output says."""
    assert main(["plan", "--profile", "small"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "train-teacher-fold0-modelgemma3" in x)
    assert " ? " in line
    assert "no throughput figures in orchestration.estimate.models for" in out and "left out of the totals" in out


# ---------------------------------------------------------------- the recipe table and its graph

def test_lmsys_steps_prints_the_numbered_recipe_in_order(capsys):
    from lmsys.steps.recipe import RECIPE
    assert main(["steps"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert [n for n, _ in rows] == ["D1", "D2", "D3", "1", "1", "2", "2.5", "2.5", "3", "4", "4.5", "5", "6", "7",
                                    "8", "8.5", "9"]
    assert [s for _, s in rows] == [s.name for s in RECIPE for _ in (s.number, *s.also)]
    assert dict(rows)["8.5"] == "predict"                     # TTA is carried out by the predict step


def test_the_flow_the_dvc_stages_and_the_cli_read_one_table():
    from lmsys.cli import build_parser
    from stages.lineage import dvc_stages
    cfg = load_config()
    assert list(dvc_stages()) == list(dict.fromkeys(n for n, _ in tasks_of(cfg)))       # the table's order
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(STEPS) <= set(sub.choices)


def test_each_task_waits_only_for_the_tasks_that_write_its_inputs():
    from lmsys.steps.recipe import graph, levels
    cfg = load_config("tiny")
    deps = graph(cfg)
    assert set(deps) == {task_label(n, k) for n, k in tasks_of(cfg)}
    # a fold's teacher logits wait for that fold's teacher only, not the other folds' or teachers'
    assert [d for d in deps["teacher-logits-fold0-modelllama"] if d.startswith("train-teacher")] == \
        ["train-teacher-fold0-modelllama"]
    assert sorted(d for d in deps["distill-fold1"] if d.startswith(("filter-argmax", "calibrate"))) == \
        ["calibrate-modelllama", "calibrate-modelqwen", "filter-argmax-fold1"]
    over = load_config("tiny", {"calibrate.enabled": False})
    assert [d for d in graph(over)["distill-fold1"] if d.startswith("teacher-logits")] == \
        ["teacher-logits-fold1-modelllama", "teacher-logits-fold1-modelqwen"]   # without step 4.5: its own fold's
    lv = levels(cfg)
    assert [t for level in lv for t in level] != [] and lv[0] == [("demo-data", {})]
    seen: set[str] = set()
    for level in lv:                           # every task's upstream tasks are in earlier levels
        assert all(set(deps[task_label(n, k)]) <= seen for n, k in level)
        seen |= {task_label(n, k) for n, k in level}
