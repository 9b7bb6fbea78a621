"""The task graph and what it will cost, before anything runs (`lmsys plan`).

Which tasks run, and what each waits for, is lmsys.steps.recipe (plan, graph, levels).

`estimate(cfg, gpus)` prices every task from the figures in `orchestration.estimate` (params.yaml,
per profile, with the device they were measured on): rows per step from the prepared tables when
they exist, else `estimate.rows` or the demo sizes; samples/s per model for training and inference
on one device; load seconds per model build; fixed seconds for the CPU steps, the merge and GPTQ.
Each task gets its job template (GPU or CPU SLURM job: partition, gres, memory, cores, walltime)
and timeout (orchestration.slurm / cpu_job / timeouts). The wall time on N GPUs is estimated level by
level (recipe.levels: the sum of each level's makespan, its GPU tasks placed longest first on the
least-loaded GPU, CPU tasks beside them): an upper bound, since the flow starts each task as soon as
its inputs exist; the critical path is the longest task of each level.

No Prefect import: the CLI, the flow and the checks use it alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmsys.paths import Layout
from lmsys.steps.recipe import STEPS, levels, task_label


# ---------------------------------------------------------------- resources and timeouts

def job_template(cfg: dict, gpu: bool) -> dict:
    """The SLURM job a step runs in: orchestration.slurm (GPU steps) or orchestration.slurm.cpu_job
    (CPU steps; its null entries fall back to the GPU template's). Keys: queue, walltime, memory,
    cores, gpus."""
    s = cfg["orchestration"]["slurm"]
    gpu_job = {"queue": s["queue"], "walltime": s["walltime"], "memory": s["memory"], "cores": int(s["cores"]),
               "gpus": int(s["gpus_per_job"])}
    if gpu:
        return gpu_job
    cpu = s.get("cpu_job") or {}
    return {**gpu_job, **{k: v for k, v in cpu.items() if v is not None}, "gpus": 0}


def step_timeout(cfg: dict, name: str) -> int:
    """Seconds a step may run: orchestration.timeouts[name], else orchestration.timeout_s."""
    o = cfg["orchestration"]
    return int((o.get("timeouts") or {}).get(name) or o["timeout_s"])


def walltime_s(text: str) -> int:
    """SLURM walltime "[D-]HH:MM:SS" -> seconds. Raises ValueError on another form."""
    days, _, hms = str(text).rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    if len(parts) != 3:
        raise ValueError(f"walltime {text!r} is not [D-]HH:MM:SS")
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


# ---------------------------------------------------------------- sizes

def dataset_rows(cfg: dict) -> dict[str, int]:
    """Rows of train, external, ut, test: the prepared tables when they exist, else
    orchestration.estimate.rows (the real data's sizes), else the demo parameters."""
    layout = Layout.of(cfg)
    est = (cfg["orchestration"].get("estimate") or {}).get("rows") or {}
    demo = cfg["demo"]
    fallback = {"train": demo["rows"], "external": demo["external_rows"], "ut": demo["ut_rows"], "test": demo["test_rows"]}
    out = {}
    for name in ("train", "external", "ut", "test"):
        path = layout.prepared / f"{name}.parquet"
        if path.exists():
            import pyarrow.parquet as pq
            out[name] = pq.ParquetFile(path).metadata.num_rows
        else:
            out[name] = int(est[name]) if est.get(name) is not None else fallback[name]
    return out


def _work(cfg: dict, name: str, keys: dict, rows: dict[str, int]) -> tuple[str | None, str, float]:
    """(model, 'train' | 'infer' | fixed step, samples) of one task."""
    n_folds = cfg["folds"]["n_folds"]
    comp, ext = rows["train"], rows["external"]
    fold_train = comp * (n_folds - 1) / n_folds + ext            # one fold's training part
    fold_val = comp / n_folds

    def epochs_of(section: str, n: float) -> float:
        c = cfg[section]
        samples = n * float(c.get("epochs", 1))
        if c.get("max_steps"):
            samples = min(samples, c["max_steps"] * c["batch_size"] * c["grad_accum"])
        return samples

    student = cfg["models"]["student"]
    if name == "post-pretrain":
        ut = min(rows["ut"], cfg["post_pretrain"]["max_rows"] or rows["ut"])
        return keys["model"], "train", epochs_of("post_pretrain", 0.9 * ut)
    if name == "post-pretrain-student":
        ut = min(rows["ut"], cfg["post_pretrain"]["max_rows"] or rows["ut"])
        return student, "train", epochs_of("post_pretrain", 0.9 * ut)
    if name == "filter-score":
        return keys["model"], "infer", comp + ext
    if name == "train-teacher":
        n = cfg["train_teacher"]["subset_size"] or fold_train
        return keys["model"], "train", epochs_of("train_teacher", 2 * min(n, fold_train))
    if name == "teacher-logits":
        n = cfg["train_teacher"]["subset_size"] or fold_train
        return keys["model"], "infer", 2 * min(n, fold_train) + 2 * fold_val
    if name == "distill":
        n = cfg["train_teacher"]["subset_size"] or fold_train
        return student, "distill", epochs_of("distill", 2 * min(n, fold_train))
    if name == "predict":
        return student, "infer", rows["test"] * (2 if cfg["predict"]["tta"] else 1)
    return None, name, 0.0


# ---------------------------------------------------------------- estimates

@dataclass
class TaskEstimate:
    task: str
    step: str
    gpu: bool
    job: dict
    timeout_s: int
    samples: float          # forward (inference) or training samples
    seconds: float          # estimated wall time on one device (its job)
    gpu_hours: float
    level: int


def task_estimate(cfg: dict, name: str, keys: dict, rows: dict[str, int], level: int) -> TaskEstimate:
    """One task's resources and estimated wall time from orchestration.estimate."""
    est = cfg["orchestration"]["estimate"]
    step = STEPS[name]
    model, kind, samples = _work(cfg, name, keys, rows)
    figures = (est.get("models") or {}).get(model) or {}
    fixed = est.get("step_s") or {}
    if model is None:
        seconds = float(fixed.get(name, est.get("cpu_step_s", 10)))
    elif not {"train", "infer"} <= set(figures):        # no figures for this model: unknown, shown as "?"
        seconds = float("nan")
    else:
        rate = float(figures["train" if kind in ("train", "distill") else "infer"])
        seconds = float(figures.get("load_s", 0)) + samples / rate
        if kind == "distill":    # plus its out-of-fold predictions (validation rows, both orders)
            seconds += 2 * rows["train"] / cfg["folds"]["n_folds"] / float(figures["infer"])
    return TaskEstimate(task_label(name, keys), name, step.gpu, job_template(cfg, step.gpu), step_timeout(cfg, name),
                        samples, seconds, seconds / 3600 if step.gpu else 0.0, level)


def estimate(cfg: dict, gpus: int = 1) -> dict:
    """Every task of the run priced (TaskEstimate), the total GPU-hours, the wall time on `gpus`
    GPUs (sum over levels of each level's makespan, GPU tasks placed longest first on the least-loaded
    GPU) and the critical path (each level's longest task). Raises ValueError for gpus < 1 and
    KeyError when a model has no figures in orchestration.estimate.models."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    rows = dataset_rows(cfg)
    tasks, wall, path = [], 0.0, []
    for i, level in enumerate(levels(cfg)):
        ests = [task_estimate(cfg, n, k, rows, i) for n, k in level]
        tasks += ests
        loads = [0.0] * gpus
        for t in sorted((t for t in ests if t.gpu), key=lambda t: -_known(t.seconds)):
            loads[loads.index(min(loads))] += _known(t.seconds)
        cpu = max((_known(t.seconds) for t in ests if not t.gpu), default=0.0)
        wall += max(max(loads), cpu)
        path.append(max(ests, key=lambda t: _known(t.seconds)).task)
    return {"profile": cfg["profile"], "gpus": gpus, "rows": rows, "tasks": tasks,
            "card": cfg["orchestration"]["estimate"].get("card"),
            "gpu_hours": sum(t.gpu_hours for t in tasks if t.gpu_hours == t.gpu_hours), "wall_s": wall,
            "critical_path": path}


def _known(seconds: float) -> float:
    """seconds, or 0 for an unknown (nan) estimate."""
    return seconds if seconds == seconds else 0.0


def _hms(seconds: float) -> str:
    if seconds != seconds:                     # nan: no throughput figures
        return "?"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_plan(e: dict) -> str:
    """The estimate as a text table: one line per task with its job, timeout, samples, wall time and
    GPU-hours, then the totals and the critical path."""
    lines = [f"profile {e['profile']}: {len(e['tasks'])} tasks; rows {e['rows']}",
             f"throughput figures measured on: {e['card']}",
             f"{'level':>5}  {'task':<34} {'job':<44} {'timeout':>8} {'samples':>10} {'est. wall':>10} {'GPU-h':>8}"]
    for t in e["tasks"]:
        j = t.job
        job = (f"{j['queue']} gres=gpu:{j['gpus']} " if t.gpu else f"{j['queue']} cpu ") + \
              f"mem={j['memory']} cores={j['cores']} wall={j['walltime']}"
        warn = " !walltime" if t.seconds > walltime_s(j["walltime"]) else ""
        warn += " !timeout" if t.seconds > t.timeout_s else ""
        lines.append(f"{t.level:>5}  {t.task:<34} {job:<44} {_hms(t.timeout_s):>8} {t.samples:>10.0f} "
                     f"{_hms(t.seconds):>10} {t.gpu_hours:>8.2f}{warn}")
    by_step: dict[str, float] = {}
    for t in e["tasks"]:
        by_step[t.step] = by_step.get(t.step, 0.0) + t.gpu_hours
    total = e["gpu_hours"] or 1.0
    lines.append("GPU-hours by step: " + ", ".join(f"{s} {h:.2f} ({100 * h / total:.0f}%)" for s, h in
                                                   sorted(by_step.items(), key=lambda kv: -kv[1]) if h > 0))
    unknown = sorted({t.task for t in e["tasks"] if t.seconds != t.seconds})
    if unknown:
        lines.append(f"no throughput figures in orchestration.estimate.models for {len(unknown)} task(s) "
                     f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): left out of the totals")
    lines += [f"total: {e['gpu_hours']:.1f} GPU-hours; wall time on {e['gpus']} GPU(s), level by level: "
              f"{_hms(e['wall_s'])} ({e['wall_s'] / 86400:.2f} days)",
              "critical path (longest task of each level): " + " -> ".join(e["critical_path"])]
    return "\n".join(lines)


def cmd_plan(args) -> int:
    """`lmsys plan [--profile P] [--gpus N] [--set K=V]`: print the estimate; 0, or 2 with an error: line."""
    import sys

    from lmsys.config import load_config, parse_override
    try:
        cfg = load_config(args.profile, dict(parse_override(o) for o in (args.set or [])), getattr(args, "params", None))
        if getattr(args, "root", None):
            cfg["root"] = str(args.root)
        print(format_plan(estimate(cfg, args.gpus)))
    except (KeyError, ValueError) as e:
        print(f"error: params.yaml orchestration.estimate: {e}", file=sys.stderr)
        return 2
    return 0
