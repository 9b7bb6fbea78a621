"""The cost plan (`lmsys plan`): every task of a run priced, then scheduled on N GPUs, before anything runs.

Which tasks run, and what each waits for, is lmsys.steps.recipe (tasks_of, graph).

Pricing, from `orchestration.estimate` (params.yaml, per profile; every figure printed with its source):
  work     each task's passes in tokens (lmsys.token_model): training rows x computed tokens a row
           (packed or padded, trainer.packing), inference rows x real tokens a row, the evaluation
           passes lmsys.train makes, one model load per job segment; each dataset's rows with their
           own token statistics (estimate.tokens), cut at text.train_max_length / infer_max_length;
  rates    tokens/s per model on `estimate.card` (measured, or scaled from a measured model by
           FLOPs a token), times the factors that apply (gradient checkpointing, nf4, nf4 built for
           training); `--card` rescales by the cards' sustained throughput;
  width    orchestration.step_gpus: a step's job holds that many GPUs data-parallel, and
           wall = load + one-GPU work / (GPUs x dp_efficiency); GPU-hours = sum of GPUs x wall;
  jobs     a step's walltime from its estimate (x walltime_margin, to the hour, at most the
           partition's); a resumable step longer than that is split into job segments (requeued,
           each paying a load and half a checkpoint interval again); host memory and disk of each
           job checked against what its ranks load and write.
Scheduling (lmsys.schedule): list scheduling by the task graph with each step's width; the critical
path is the longest chain of dependent tasks. With the `local-gpus` runner (one machine, no SLURM) the
GPUs are the runner's workers' device groups (local_gpu_layout: the same groups flows/runners.py
starts workers for), there are no job templates, walltimes or segments, and host memory and disk
are not checked (one machine's memory is shared by the tasks running on it).

No Prefect import: the CLI, the flow and the checks use it alike.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lmsys import schedule, token_model
from lmsys.distributed import step_width
from lmsys.paths import Layout
from lmsys.steps.recipe import STEPS, graph, task_label, tasks_of

TRAINING_STEPS = ("post-pretrain", "post-pretrain-student", "train-teacher", "distill")   # resume from checkpoints
SHARDED_STEPS = ("filter-score", "teacher-logits")                                       # resume from shards


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


def gpu_widths(cfg: dict, n_devices: int) -> list[int]:
    """The GPU widths a run uses on n_devices GPUs: 1 and each GPU step's step_width, cut to n_devices."""
    return sorted({1} | {min(step_width(cfg, s.name), n_devices) for s in STEPS.values() if s.gpu})


def local_gpu_devices(cfg: dict, gpus: int | None = None) -> list[str]:
    """The devices of the local-gpus runner, as CUDA_VISIBLE_DEVICES names them: `gpus` devices 0..gpus-1
    when given (a plan for a machine of that many GPUs), else orchestration.local_gpus: a list of device
    ids, or "auto": every device torch sees here (0..torch.cuda.device_count()-1; none without CUDA)."""
    if gpus is not None:
        return [str(i) for i in range(gpus)]
    listed = cfg["orchestration"]["local_gpus"]
    if listed == "auto":
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    return [str(d) for d in listed]


def local_gpu_layout(cfg: dict, gpus: int | None = None) -> list[tuple[str, ...]]:
    """The device groups of the local-gpus runner's GPU workers (lmsys.schedule.device_groups of
    local_gpu_devices and the run's widths). Raises ValueError when there is no device."""
    devices = local_gpu_devices(cfg, gpus)
    if not devices:
        raise ValueError("the local-gpus runner has no GPU: orchestration.local_gpus is auto and torch sees no "
                         "CUDA device here; list the device ids (orchestration.local_gpus: [0, 1, ...]) or use --runner local")
    if len(set(devices)) != len(devices):
        raise ValueError(f"orchestration.local_gpus lists a device twice: {devices}")
    return schedule.device_groups(devices, gpu_widths(cfg, len(devices)))


def walltime_s(text: str) -> int:
    """SLURM walltime "[D-]HH:MM:SS" -> seconds. Raises ValueError on another form."""
    days, _, hms = str(text).rpartition("-")
    parts = [int(p) for p in hms.split(":")]
    if len(parts) != 3:
        raise ValueError(f"walltime {text!r} is not [D-]HH:MM:SS")
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def walltime_text(seconds: float) -> str:
    """Seconds -> SLURM "[D-]HH:MM:SS", rounded up to the minute."""
    m = math.ceil(seconds / 60)
    d, m = divmod(m, 1440)
    return (f"{d}-" if d else "") + f"{m // 60:02d}:{m % 60:02d}:00"


def memory_gb(text: str) -> float:
    """SLURM memory "128GB" / "500M" / "2T" -> GB. Raises ValueError on another form."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"memory {text!r} is not a number with K/M/G/T")
    return float(m.group(1)) * {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3, "": 1e-3}[m.group(2).upper()]


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


# ---------------------------------------------------------------- throughput

@dataclass
class Rates:
    """One model's tokens/s on the plan's card, the factors applied, and how each was reached."""
    model: str
    train: float              # computed tokens/s of a training build
    infer: float              # real tokens/s of an inference-only build, on the path the code takes
    evaluate: float           # real tokens/s of the trainer's evaluation (padded path, the training build)
    load_s: float
    how: str                  # the arithmetic, printed


def card_ratio(cfg: dict, card: str | None, precision: str = "bf16") -> tuple[float, str]:
    """(ratio, arithmetic) that rescales the figures of estimate.card to `card` by their sustained
    throughput. Raises KeyError for an unknown card or one without that figure."""
    est = cfg["orchestration"]["estimate"]
    base = est["card"]
    if card is None or card == base:
        return 1.0, ""
    cards = est.get("cards") or {}
    for c in (card, base):
        if c not in cards or not (cards[c] or {}).get(precision):
            raise KeyError(f"cards.{c}.{precision}: no sustained {precision} figure to rescale with "
                           f"(cards with one: {sorted(k for k, v in cards.items() if (v or {}).get(precision))})")
    ratio = float(cards[card][precision]) / float(cards[base][precision])
    return ratio, f" x {cards[card][precision]}/{cards[base][precision]} ({card}/{base} {precision})"


def model_rates(cfg: dict, model: str, card: str | None = None) -> Rates | None:
    """Tokens/s of `model` on `card` (default estimate.card), or None when estimate.models has no
    figures for it. A model with `scale: M` takes M's figures x M's params_b / its own (FLOPs a token)."""
    est = cfg["orchestration"]["estimate"]
    figures = (est.get("models") or {}).get(model)
    if not figures:
        return None
    base, how = figures, ""
    if figures.get("scale"):
        base = est["models"][figures["scale"]]
        how = f" x {base['params_b']}/{figures['params_b']} ({figures['scale']} -> {model}, FLOPs a token)"
    if not {"train_tok_s", "infer_tok_s"} <= set(base):
        return None
    ratio, card_how = card_ratio(cfg, card)
    scale = ratio * (float(base["params_b"]) / float(figures["params_b"]) if figures.get("scale") else 1.0)
    spec = cfg["models"]["specs"].get(model) or {}
    nf4, code = spec.get("quantization") == "nf4", est.get("code") or {}
    checkpointing = bool(spec.get("gradient_checkpointing")) or nf4    # peft's kbit preparation turns it on
    packed = inference_packed(cfg, card)[0] and "infer_packed_tok_s" in base
    # inference-only nf4 builds skip peft's training preparation (lmsys.models); the trainer's evaluation
    # runs on the training build, fp32 casts included. estimate.code.nf4_inference_bf16 false re-prices d5c1397.
    fp32_cast_infer = nf4 and not code.get("nf4_inference_bf16", True)
    applied = {"train": [("gradient_checkpointing", checkpointing), ("nf4_train", nf4)],
               "infer": [("nf4_infer", nf4), ("nf4_fp32_cast", fp32_cast_infer)],
               "evaluate": [("nf4_infer", nf4), ("nf4_fp32_cast", nf4)]}
    start = {"train": base["train_tok_s"], "infer": base["infer_packed_tok_s" if packed else "infer_tok_s"],
             "evaluate": base["infer_tok_s"]}
    names = {"train": "train", "infer": f"infer ({'packed' if packed else 'padded'})", "evaluate": "evaluate"}
    out, lines = {}, []
    for what, factors in applied.items():
        f = [(n, _factor(est, n)) for n, on in factors if on]
        out[what] = float(start[what]) * scale * math.prod(v for _, v in f)
        arithmetic = f"{how}{card_how}" + "".join(f" x {v:g} ({n})" for n, v in f)
        lines.append(f"{names[what]} {out[what]:,.0f}" + (f" = {float(start[what]):,.0f}{arithmetic}" if arithmetic else ""))
    return Rates(model, out["train"], out["infer"], out["evaluate"], float(figures.get("load_s", 0)), "; ".join(lines))


def inference_packed(cfg: dict, card: str | None = None) -> tuple[bool, str]:
    """(does inference take the packed path on `card` (default estimate.card), why): what
    lmsys.infer.route decides on a GPU of that card, from params.yaml's `infer` and the card's compute
    capability (estimate.cards.<card>.capability; none: not a CUDA card, e.g. the CPU)."""
    settings, est = cfg["infer"], cfg["orchestration"]["estimate"]
    card = card or est["card"]
    if settings["packed"] != "auto":
        return bool(settings["packed"]), f"infer.packed {str(settings['packed']).lower()}"
    cap = str(((est.get("cards") or {}).get(card) or {}).get("capability") or "")
    verified = [str(c) for c in settings["verified_capabilities"]]
    if not cap:
        return False, f"infer.packed auto: card {card} has no CUDA capability (estimate.cards.{card}.capability)"
    if cap not in verified:
        return False, f"infer.packed auto: card {card}'s capability {cap} is not in infer.verified_capabilities {verified}"
    return True, f"infer.packed auto: card {card}'s capability {cap} is verified"


def _factor(est: dict, name: str) -> float:
    """estimate.factors[name].value (1 when the profile gives none)."""
    return float(((est.get("factors") or {}).get(name) or {}).get("value", 1.0))


# ---------------------------------------------------------------- the work of a task, in tokens

@dataclass
class Pass:
    """Passes of a task over its rows: train (computed tokens), evaluate or infer (real tokens)."""
    what: str
    rows: float               # rows visited, every epoch or evaluation
    tokens: float             # computed tokens a row visited
    rate: float               # tokens/s (nan: unknown)
    distinct: float = 0.0     # rows tokenised (held in memory)
    real: float = 0.0         # real tokens a row

    @property
    def seconds(self) -> float:
        return self.rows * self.tokens / self.rate


def token_mixture(cfg: dict, *parts: tuple[str, float]) -> token_model.Mixture:
    """((median, p90, rows), ...) of (dataset, rows) pairs, from estimate.tokens. Raises KeyError for
    a dataset without statistics."""
    stats = cfg["orchestration"]["estimate"]["tokens"]
    return tuple((float(stats[d]["median"]), float(stats[d]["p90"]), float(n)) for d, n in parts if n > 0)


def training_samples(section: dict, rows: float) -> float:
    """Rows a training run visits: rows x epochs, at most max_steps x batch_size x grad_accum."""
    samples = rows * float(section.get("epochs", 1))
    if section.get("max_steps"):
        samples = min(samples, section["max_steps"] * section["batch_size"] * section.get("grad_accum", 1))
    return samples


def task_passes(cfg: dict, name: str, rows: dict[str, int], rates: Rates | None) -> list[Pass]:
    """What a task of step `name` computes: its training, evaluation and inference passes."""
    nan = float("nan")
    train_rate, infer_rate, eval_rate = (rates.train, rates.infer, rates.evaluate) if rates else (nan, nan, nan)
    train_len, infer_len = cfg["text"]["train_max_length"], cfg["text"]["infer_max_length"]
    n_folds = cfg["folds"]["n_folds"]
    fold_comp, ext, fold_val = rows["train"] * (n_folds - 1) / n_folds, rows["external"], rows["train"] / n_folds
    subset = cfg["train_teacher"]["subset_size"]
    share = min(1.0, subset / (fold_comp + ext)) if subset else 1.0        # the subset's share of each dataset
    fold_mix = token_mixture(cfg, ("competition", fold_comp * share), ("external", ext * share))
    n_fold = 2 * (fold_comp + ext) * share                                  # with the A/B-swapped copies
    val_at = lambda length: token_model.mean_tokens(token_mixture(cfg, ("competition", fold_val)), length)

    def trained(section: dict, mix, n: float, n_val: float, val_tokens: float) -> list[Pass]:
        t = token_model.training_tokens(mix, train_len, section)
        return [Pass("train", training_samples(section, n), t["computed"], train_rate, n, t["real"]),
                Pass("evaluate", token_model.evaluation_passes(round(n), section) * n_val, val_tokens, eval_rate,
                     n_val, val_tokens)]

    def inferred(n: float, tokens: float) -> Pass:
        return Pass("infer", n, tokens, infer_rate, n, tokens)

    if name in ("post-pretrain", "post-pretrain-student"):
        ut = min(rows["ut"], cfg["post_pretrain"]["max_rows"] or rows["ut"])
        mix = token_mixture(cfg, ("ut", ut))
        section = {**cfg["post_pretrain"], "eval_every": None}               # step 1 evaluates once, at the end
        return trained(section, mix, ut - ut // 10, ut // 10, token_model.mean_tokens(mix, train_len))
    if name == "filter-score":
        mix = token_mixture(cfg, ("competition", rows["train"]), ("external", ext))
        return [inferred(rows["train"] + ext, token_model.mean_tokens(mix, train_len))]
    if name == "train-teacher":
        return trained(cfg["train_teacher"], fold_mix, n_fold, fold_val, val_at(train_len))
    if name == "teacher-logits":
        return [inferred(n_fold, token_model.mean_tokens(fold_mix, train_len)), inferred(2 * fold_val, val_at(infer_len))]
    if name == "distill":        # plus its out-of-fold predictions: the validation rows, both orders
        return [*trained(cfg["distill"], fold_mix, n_fold, fold_val, val_at(train_len)),
                inferred(2 * fold_val, val_at(infer_len))]
    if name == "predict":
        test = token_model.mean_tokens(token_mixture(cfg, ("competition", rows["test"])), infer_len)
        return [inferred(rows["test"] * (2 if cfg["predict"]["tta"] else 1), test)]
    return []


def task_model(cfg: dict, name: str, keys: dict) -> str | None:
    """The model a task loads (None: a fixed-cost step)."""
    if name in ("post-pretrain", "filter-score", "train-teacher", "teacher-logits"):
        return keys["model"]
    if name in ("post-pretrain-student", "distill", "predict"):
        return cfg["models"]["student"]
    return None


# ---------------------------------------------------------------- one task's job

@dataclass
class TaskEstimate:
    task: str
    step: str
    gpu: bool
    width: int                # GPUs its job holds (0: a CPU task)
    job: dict                 # its SLURM job: the template with gres=gpu:width and the step's walltime
    timeout_s: int
    samples: float            # training rows visited, or inference rows
    passes: list[Pass]
    one_gpu_s: float          # the task on one device: load + every pass (nan: no figures)
    seconds: float            # wall of its job(s) at its width, every segment included
    segments: int = 1         # jobs it runs in (requeued, resuming), when longer than one job's walltime
    gpu_hours: float = 0.0
    resources: list[str] = field(default_factory=list)    # host memory / disk arithmetic
    flags: list[str] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


def task_estimate(cfg: dict, name: str, keys: dict, rows: dict[str, int], gpus: int, card: str | None,
                  local: bool = False) -> TaskEstimate:
    """One task priced: its passes, its width (step_gpus, at most `gpus`), wall and GPU-hours, its
    job's walltime, segments and resources (`local`: on the local-gpus runner: no job template, no
    walltime, no segments, no resource checks)."""
    est, step = cfg["orchestration"]["estimate"], STEPS[name]
    model = task_model(cfg, name, keys)
    rates = model_rates(cfg, model, card) if model else None
    passes = task_passes(cfg, name, rows, rates)
    width = min(step_width(cfg, name), gpus) if step.gpu else 0
    load = rates.load_s if rates else 0.0
    if model is None:            # a fixed-cost step (CPU steps, ensemble, quantize): not data-parallel
        work, speed = float((est.get("step_s") or {}).get(name, est.get("cpu_step_s", 10))), 1.0
    else:                        # nan when the model has no figures
        work = sum(p.seconds for p in passes) if rates else float("nan")
        speed = width * float(est.get("dp_efficiency", 1.0)) if width > 1 else 1.0
    job = LOCAL_JOB if local else job_template(cfg, step.gpu)
    t = TaskEstimate(task_label(name, keys), name, step.gpu, width, {**job, "gpus": width},
                     step_timeout(cfg, name), sum(p.rows for p in passes if p.what != "evaluate"), passes,
                     load + work, load + work / speed)
    if t.seconds == t.seconds and not local:
        _fit_jobs(cfg, t, _restart_s(cfg, t, load, speed))
    if t.seconds > t.timeout_s:
        t.flags.append("!timeout")
    t.gpu_hours = width * t.seconds / 3600 if t.seconds == t.seconds else 0.0
    t.resources = [] if local else _resources(cfg, t, model)
    return t


# a task's "job" on the local-gpus runner: a worker on this machine, no template, no walltime
LOCAL_JOB = {"queue": "local", "walltime": None, "memory": None, "cores": None}


def _restart_s(cfg: dict, t: TaskEstimate, load: float, speed: float) -> float | None:
    """What a requeued segment of a resumable task pays again: the model load and, on average, half
    the work between two checkpoints (training) or shards (inference). None: not resumable."""
    if t.step in TRAINING_STEPS:
        section = _section(cfg, t.step)
        checkpoint_rows = section["batch_size"] * section.get("grad_accum", 1) * int(section.get("checkpoint_every") or 1)
        train = next(p for p in t.passes if p.what == "train")
        return load + 0.5 * min(checkpoint_rows, train.rows) * train.tokens / train.rate / speed
    if t.step in SHARDED_STEPS:
        first = t.passes[0]
        return load + 0.5 * min(int(cfg["orchestration"]["shard_rows"]), first.rows) * first.tokens / first.rate / speed
    return None


def _fit_jobs(cfg: dict, t: TaskEstimate, restart: float | None) -> None:
    """The step's walltime (its estimate x walltime_margin, to the hour, at most the partition's), and,
    for a resumable task longer than a job holds (the partition's walltime / margin), its job segments."""
    limit = walltime_s(t.job["walltime"])
    margin = float(cfg["orchestration"]["estimate"].get("walltime_margin", 1.0))
    if restart is not None and t.seconds * margin > limit:
        t.segments, t.seconds = schedule.segments(t.seconds, limit / margin, restart)
    per_job = t.seconds / t.segments
    t.job["walltime"] = walltime_text(min(limit, 3600 * math.ceil(margin * per_job / 3600)))
    if per_job > limit:
        t.flags.append("!walltime")


def _resources(cfg: dict, t: TaskEstimate, model: str | None) -> list[str]:
    """Host memory and disk a GPU task's job needs, with the arithmetic, flagged (!memory, !disk) when
    over the job template's memory or estimate.job_disk_gb. Each of its ranks holds a process, the
    weight shard being read while it loads (weights go to the GPU shard by shard) and the task's
    token ids as Python lists; disk holds the model's weights once and what the task writes (a
    training task: its adapter in checkpoint/ with AdamW's two moments, best/ and final/: 5 copies).
    Empty when the profile gives no sizes for the model."""
    est = cfg["orchestration"]["estimate"]
    figures, host = (est.get("models") or {}).get(model) or {}, est.get("host") or {}
    if not t.gpu or "shard_gb" not in figures or not host:
        return []
    real_tokens = sum(p.distinct * p.real for p in t.passes)     # every row tokenised once
    lists_gb = real_tokens * float(host["bytes_per_token"]) / 1e9
    per_rank = float(host["rank_gb"]) + float(figures["shard_gb"]) + lists_gb
    need, have = t.width * per_rank, memory_gb(t.job["memory"])
    out = [f"host {t.width} x ({host['rank_gb']} GB process + {figures['shard_gb']} GB weight shard + "
           f"{real_tokens / 1e6:,.0f} M tokens x {host['bytes_per_token']} B = {lists_gb:.1f} GB token lists) = "
           f"{need:.0f} GB of {t.job['memory']}"]
    if need > have:
        t.flags.append("!memory")
    writes = 5 * float(figures.get("adapter_gb", 0)) if t.step in TRAINING_STEPS else 0.0
    disk = float(figures.get("weights_gb", 0)) + writes
    out.append(f"disk {figures.get('weights_gb', 0)} GB weights + {writes:.1f} GB written = {disk:.0f} GB"
               + (f" of {est['job_disk_gb']} GB" if est.get("job_disk_gb") else ""))
    if est.get("job_disk_gb") and disk > float(est["job_disk_gb"]):
        t.flags.append("!disk")
    return out


def _section(cfg: dict, step: str) -> dict:
    """The trainer section of a training step."""
    return cfg["post_pretrain" if step.startswith("post-pretrain") else step.replace("-", "_")]


# ---------------------------------------------------------------- the run

def estimate(cfg: dict, gpus: int | None = 1, card: str | None = None) -> dict:
    """Every task of the run priced (TaskEstimate, with its scheduled start and end), the total
    GPU-hours, the wall time of the list schedule on `gpus` GPUs and the critical path. With
    orchestration.runner local-gpus the schedule runs on the local runner's device groups
    (local_gpu_layout: `gpus` devices, or orchestration.local_gpus when gpus is None) and its CPU
    workers (orchestration.local_workers). Raises ValueError for gpus < 1 (or no local GPU) and
    KeyError for a dataset or card without figures."""
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    local = cfg["orchestration"]["runner"] == "local-gpus"
    groups = local_gpu_layout(cfg, gpus) if local else None
    gpus = len({d for g in groups for d in g}) if local else (1 if gpus is None else gpus)
    rows = dataset_rows(cfg)
    tasks = [task_estimate(cfg, n, k, rows, gpus, card, local) for n, k in tasks_of(cfg)]
    deps = graph(cfg)
    jobs = [schedule.Job(t.task, _known(t.seconds), t.width) for t in tasks]
    cpu_slots = int(cfg["orchestration"]["local_workers"]) if local else int(cfg["orchestration"]["slurm"].get("cpu_jobs") or 1)
    placed = schedule.list_schedule(jobs, deps, gpus, cpu_slots, groups)
    for t in tasks:
        t.start, t.end = placed[t.task]
    path, path_s = schedule.critical_path(jobs, deps)
    cut = {t.step: step_width(cfg, t.step) for t in tasks if t.gpu and step_width(cfg, t.step) > gpus}
    return {"profile": cfg["profile"], "gpus": gpus, "rows": rows, "tasks": tasks, "groups": groups,
            "card": card or cfg["orchestration"]["estimate"]["card"],
            "gpu_hours": sum(t.gpu_hours for t in tasks), "wall_s": max(t.end for t in tasks),
            "critical_path": path, "critical_path_s": path_s, "widths_cut": cut, "basis": basis(cfg, tasks, card)}


def _known(seconds: float) -> float:
    """seconds, or 0 for an unknown (nan) estimate."""
    return seconds if seconds == seconds else 0.0


def basis(cfg: dict, tasks: list[TaskEstimate], card: str | None = None) -> list[str]:
    """What the estimate rests on, one line per figure with its source: the card, each dataset's
    tokens, each model's rates, the factors, the training tokens a row, data parallelism."""
    est = cfg["orchestration"]["estimate"]
    card = card or est["card"]
    cards = est.get("cards") or {}
    lines = [f"card {card}: {(cards.get(card) or {}).get('source', '(no source)')}"]
    if card != est["card"]:
        lines.append(f"  figures rescaled from card {est['card']}: {(cards.get(est['card']) or {}).get('source', '')}")
    train_len, infer_len = cfg["text"]["train_max_length"], cfg["text"]["infer_max_length"]
    for name, t in (est.get("tokens") or {}).items():
        mix = token_mixture(cfg, (name, 1))
        lines.append(f"tokens {name}: median {t['median']}, p90 {t['p90']} -> {token_model.mean_tokens(mix, train_len):.0f} "
                     f"real a row at {train_len}, {token_model.mean_tokens(mix, infer_len):.0f} at {infer_len} ({t['source']})")
    for model in dict.fromkeys([*cfg["models"]["teachers"], cfg["models"]["student"]]):
        rates = model_rates(cfg, model, card)
        source = ((est.get("models") or {}).get(model) or {}).get("source", "")
        lines.append(f"rates {model} (tokens/s): " + (f"{rates.how}; load {rates.load_s:.0f} s" if rates
                                                      else "no figures in orchestration.estimate.models"))
        if rates and source:
            lines.append(f"  source: {source}")
    for name, f in (est.get("factors") or {}).items():
        lines.append(f"factor {name} {f['value']}: {f['source']}")
    for step in dict.fromkeys(t.step for t in tasks if t.step in TRAINING_STEPS):
        task = next(t for t in tasks if t.step == step)
        train, evals = task.passes[0], task.passes[1]
        section = _section(cfg, step)
        mode = (f"packed, {section['pack_tokens']}-token packs" if section.get("packing")
                else f"padded micro-batches of {section['batch_size']}")
        lines.append(f"training tokens a row, {step}: {train.real:.0f} real, {train.tokens:.0f} computed ({mode}: "
                     f"{train.real / train.tokens:.3f} real per computed); {evals.rows / max(evals.distinct, 1):.0f} "
                     f"evaluation pass(es) over {evals.distinct:,.0f} rows")
    widths = {k: v for k, v in (cfg["orchestration"].get("step_gpus") or {}).items() if v != 1}
    lines.append(f"data parallel: {', '.join(f'{k} {v}' for k, v in widths.items()) or 'every step on 1 GPU'}"
                 f" (orchestration.step_gpus); efficiency {est.get('dp_efficiency', 1.0)} (estimate.dp_efficiency)")
    packed, why = inference_packed(cfg, card)
    lines.append(f"inference path: {'packed' if packed else 'padded'} ({why}; lmsys.infer.route)")
    code = est.get("code") or {}
    if code:
        lines.append("older code priced: " + ", ".join(f"{k} {v}" for k, v in code.items()) + " (estimate.code)")
    return lines


# ---------------------------------------------------------------- output

def _hms(seconds: float) -> str:
    if seconds != seconds:                     # nan: no throughput figures
        return "?"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _job_text(t: TaskEstimate) -> str:
    j = t.job
    if j["queue"] == LOCAL_JOB["queue"]:
        return f"local worker gpus={t.width}" if t.gpu else "local worker cpu"
    return (f"{j['queue']} gres=gpu:{t.width} " if t.gpu else f"{j['queue']} cpu ") + \
        f"mem={j['memory']} cores={j['cores']} wall={j['walltime']}"


def format_plan(e: dict) -> str:
    """The estimate as text: what it rests on, one line per task (scheduled start, job, timeout,
    samples, wall time, GPU-hours, flags), GPU-hours by step, each step's largest job resources,
    the totals and the critical path."""
    lines = [f"profile {e['profile']}: {len(e['tasks'])} tasks on {e['gpus']} GPU(s) of card {e['card']}; rows {e['rows']}",
             "figures:", *(f"  {line}" for line in e["basis"])]
    if e.get("groups"):
        lines.append(f"  runner local-gpus: GPU workers on device groups {', '.join('+'.join(g) for g in e['groups'])} "
                     f"(a task takes a free group of its width); host memory and disk not checked")
    if e["widths_cut"]:
        lines.append(f"  step widths cut to the plan's {e['gpus']} GPU(s): "
                     + ", ".join(f"{s} {w} -> {e['gpus']}" for s, w in e["widths_cut"].items()))
    lines.append(f"{'start':>8}  {'task':<34} {'job':<48} {'timeout':>8} {'samples':>10} {'est. wall':>10} {'GPU-h':>8}")
    for t in sorted(e["tasks"], key=lambda t: (t.start, t.end)):
        flags = ([f"{t.segments} jobs (requeued)"] if t.segments > 1 else []) + t.flags
        lines.append(f"{_hms(t.start):>8}  {t.task:<34} {_job_text(t):<48} {_hms(t.timeout_s):>8} {t.samples:>10.0f} "
                     f"{_hms(t.seconds):>10} {t.gpu_hours:>8.2f}{''.join(' ' + f for f in flags)}")
    by_step: dict[str, float] = {}
    for t in e["tasks"]:
        by_step[t.step] = by_step.get(t.step, 0.0) + t.gpu_hours
    total = e["gpu_hours"] or 1.0
    lines.append("GPU-hours by step: " + ", ".join(f"{s} {h:.2f} ({100 * h / total:.0f}%)" for s, h in
                                                   sorted(by_step.items(), key=lambda kv: -kv[1]) if h > 0))
    for step in dict.fromkeys(t.step for t in e["tasks"] if t.resources):
        worst = max((t for t in e["tasks"] if t.step == step), key=lambda t: t.width * sum(p.distinct * p.real for p in t.passes))
        lines.append(f"job resources, {step} (its largest): " + "; ".join(worst.resources))
    unknown = sorted({t.task for t in e["tasks"] if t.seconds != t.seconds})
    if unknown:
        lines.append(f"no throughput figures in orchestration.estimate.models for {len(unknown)} task(s) "
                     f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): left out of the totals")
    lines += [f"total: {e['gpu_hours']:.1f} GPU-hours (sum of GPUs x wall); wall time on {e['gpus']} GPU(s), list "
              f"schedule: {_hms(e['wall_s'])} ({e['wall_s'] / 86400:.2f} days)",
              f"critical path (longest chain of dependent tasks, {_hms(e['critical_path_s'])}): "
              + " -> ".join(e["critical_path"])]
    return "\n".join(lines)


def cmd_plan(args) -> int:
    """`lmsys plan [--profile P] [--gpus N] [--runner R] [--card C] [--test-rows N --serve-cards KxCARD] [--set K=V]`:
    print the estimate (and the serving estimate); 0, or 2 with an error: line."""
    import sys

    from lmsys.config import ConfigError, load_config, parse_override
    try:
        over = dict(parse_override(o) for o in (args.set or []))
        if getattr(args, "runner", None):
            over["orchestration.runner"] = args.runner
        cfg = load_config(args.profile, over, getattr(args, "params", None))
    except ConfigError as err:                 # the parameters themselves: named by the schema
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "root", None):
            cfg["root"] = str(args.root)
        e = estimate(cfg, args.gpus, getattr(args, "card", None))
        print(format_plan(e))
        if getattr(args, "serve_cards", None):
            from lmsys.serve_estimate import format_serving, serving_estimate
            rows = args.test_rows if getattr(args, "test_rows", None) is not None else e["rows"]["test"]
            print(format_serving(serving_estimate(cfg, rows, args.serve_cards)))
    except (KeyError, ValueError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err     # KeyError's str() adds quotes
        where = "orchestration.local_gpus" if "local-gpus runner" in str(reason) else "orchestration.estimate"
        print(f"error: params.yaml {where}: {reason}", file=sys.stderr)
        return 2
    return 0
