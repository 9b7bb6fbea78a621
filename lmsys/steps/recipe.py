"""The recipe: one ordered table of the pipeline's steps, and the task graph it implies.

`RECIPE` lists every step once, in an order in which the steps can run, with the recipe's number
(../shared/docs/recipe.md; D1-D3 are the data steps before step 1), its function, the files it
reads and writes, the params.yaml keys it reads, its fan-out and whether it needs a GPU. The
Prefect flow (flows/), the Prefect tasks (tasks/), dvc.yaml (stages/), the CLI and `lmsys plan`
read this table; `lmsys steps` prints it.

`tasks_of(cfg)` is the tasks of a run, in table order; `graph(cfg)` is which tasks each task waits
for: those that write a file or directory it reads (derived from inputs/outputs, never listed).
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from lmsys import distributed
from lmsys.config import for_step
from lmsys.data.crosscheck import skips_predict
from lmsys.paths import Layout
from lmsys.steps import Step, StepResult
from lmsys.steps import folds, prepare, serve, student, teachers

log = logging.getLogger(__name__)


def _data(layout: Layout) -> list:
    return [layout.prepared / "train.parquet", layout.prepared / "external.parquet"]


def _student(cfg: dict) -> str:
    return cfg["models"]["student"]


def _student_logits(cfg, layout, fold):
    """The teacher logits fold `fold`'s student reads (calibrated when step 4.5 runs)."""
    return [student.student_logits_path(cfg, layout, m, fold) for m in teachers.teacher_names(cfg)]


def _all_folds(cfg, fn):
    return [p for k in folds.active_folds(cfg) for p in fn(k)]


_TRAIN = ("models", "text", "seed")            # what every model step reads besides its own section

RECIPE: tuple[Step, ...] = (
    Step("D1", "demo-data", prepare.run_demo_data,
         inputs=lambda cfg, layout: [],
         outputs=lambda cfg, layout: [layout.demo_dir],
         params=("demo",), cli="lmsys step demo-data"),   # `lmsys demo-data --out DIR` writes a copy anywhere
    Step("D2", "prepare", prepare.run_prepare,
         inputs=lambda cfg, layout: [p for fs in prepare.data_files(cfg, layout).values() for p in fs],
         outputs=lambda cfg, layout: [layout.prepared],
         params=("data",)),
    Step("D3", "tokenizer", teachers.run_tokenizer,
         inputs=lambda cfg, layout: [layout.prepared],
         outputs=lambda cfg, layout: [layout.tokenizer],
         params=("models", "text", "seed")),
    Step("1", "post-pretrain", teachers.run_post_pretrain,
         inputs=lambda cfg, layout, model: [layout.prepared / "ut.parquet", layout.tokenizer],
         outputs=lambda cfg, layout, model: [layout.post_pretrain(model)],
         params=("post_pretrain", *_TRAIN), fan_out=("model",), gpu=True, data_parallel=True),
    Step("1", "post-pretrain-student", student.run_post_pretrain_student,
         inputs=lambda cfg, layout: [layout.prepared / "ut.parquet", layout.tokenizer],
         outputs=lambda cfg, layout: [layout.post_pretrain(_student(cfg))],
         params=("post_pretrain", *_TRAIN), gpu=True, data_parallel=True),
    Step("2", "folds", folds.run_folds,
         inputs=lambda cfg, layout: _data(layout),
         outputs=lambda cfg, layout: [layout.folds_csv.parent],
         params=("folds.n_folds", "folds.seed")),
    Step("2.5", "filter-score", teachers.run_filter_score,
         inputs=lambda cfg, layout, model: [*_data(layout), layout.tokenizer, layout.post_pretrain(model)],
         outputs=lambda cfg, layout, model: [layout.filter_scores(model)],
         params=("models", "text", "teacher_logits.batch_size", "teacher_logits.progress_every",
                 "orchestration.shard_rows", "infer", "seed"), fan_out=("model",), gpu=True, data_parallel=True),
    Step("2.5", "filter-argmax", teachers.run_filter_argmax,
         inputs=lambda cfg, layout, fold: [*_data(layout), layout.folds_csv,
                                           layout.filter_scores(teachers.filter_model(cfg))],
         outputs=lambda cfg, layout, fold: [layout.filtered(fold)],
         params=("filter_argmax", "models.teachers"), fan_out=("fold",)),
    Step("3", "train-teacher", teachers.run_train_teacher,
         inputs=lambda cfg, layout, model, fold: [*_data(layout), layout.folds_csv, layout.tokenizer,
                                                  layout.filtered(fold), layout.post_pretrain(model)],
         outputs=lambda cfg, layout, model, fold: [layout.teacher(model, fold)],
         params=("train_teacher", *_TRAIN), fan_out=("model", "fold"), gpu=True, data_parallel=True),
    Step("4", "teacher-logits", teachers.run_teacher_logits,
         inputs=lambda cfg, layout, model, fold: [*_data(layout), layout.folds_csv, layout.tokenizer,
                                                  layout.filtered(fold), layout.teacher(model, fold)],
         outputs=lambda cfg, layout, model, fold: [layout.logits(model, fold)],
         params=("teacher_logits", "train_teacher.subset_size", "orchestration.shard_rows", "infer", *_TRAIN),
         fan_out=("model", "fold"), gpu=True, data_parallel=True),
    Step("4.5", "calibrate", student.run_calibrate,
         inputs=lambda cfg, layout, model: [layout.logits(model, k) for k in folds.active_folds(cfg)],
         outputs=lambda cfg, layout, model: [layout.calibration(model), layout.calibrated_logits(model, 0).parent],
         params=("calibrate", "folds.n_folds", "folds.use"), fan_out=("model",)),
    Step("5", "distill", student.run_distill,
         inputs=lambda cfg, layout, fold: [*_data(layout), layout.folds_csv, layout.tokenizer, layout.filtered(fold),
                                           layout.post_pretrain(_student(cfg)), *_student_logits(cfg, layout, fold)],
         outputs=lambda cfg, layout, fold: [layout.student(fold)],
         params=("distill", "train_teacher.subset_size", "calibrate.enabled", "predict.batch_size", "infer", *_TRAIN),
         fan_out=("fold",), gpu=True, data_parallel=True),
    Step("6", "ensemble", student.run_ensemble,
         inputs=lambda cfg, layout: [layout.tokenizer, layout.prepared / "train.parquet", layout.prepared / "ut.parquet",
                                     *_all_folds(cfg, lambda k: [layout.student(k)])],
         outputs=lambda cfg, layout: [layout.ensemble],
         params=("ensemble", "post_pretrain.max_rows", "predict.batch_size", "folds.n_folds", "folds.use",
                 "serve.cards", "serve.dtype", *_TRAIN),
         gpu=True),
    Step("7", "quantize", student.run_quantize,
         inputs=lambda cfg, layout: [layout.ensemble, layout.prepared / "train.parquet"],
         outputs=lambda cfg, layout: [layout.quantized],
         params=("quantize", "predict.batch_size", "text", "seed", "serve.cards", "serve.dtype"), gpu=True),
    Step("8", "predict", serve.run_predict, also=("8.5",),
         inputs=serve.predict_inputs,
         outputs=lambda cfg, layout: [layout.predictions],
         params=("predict", "infer", "text", "quantize.enabled", "quantize.backend", "data", "serve.nonfinite"), gpu=True),
    Step("9", "evaluate", serve.run_evaluate,
         inputs=lambda cfg, layout: [layout.predictions, layout.prepared, *serve.label_files(cfg, layout),
                                     *_all_folds(cfg, lambda k: [layout.student(k)]),
                                     *_all_folds(cfg, lambda k: _student_logits(cfg, layout, k)),
                                     *[layout.logits(m, k) for m in teachers.teacher_names(cfg) for k in folds.active_folds(cfg)]],
         outputs=lambda cfg, layout: [layout.reports],
         params=("evaluate", "calibrate", "quantize.enabled", "models", "folds", "data")),
)

STEPS: dict[str, Step] = {s.name: s for s in RECIPE}
# What the recipe's numbers say, for `lmsys steps` (recipe.md; D1-D3 are this pipeline's data steps).
WHAT = {"D1": "the embedded demo competition (when data.train is null)",
        "D2": "validate every input file, quarantine bad rows, dedupe, drop leaking external rows",
        "D3": "tiny profile: a byte-level BPE trained on the run's text",
        "1": "post-pretraining on the UT data, each teacher and the student",
        "2": "folds, stratified by label, grouped by prompt",
        "2.5": "filter: the post-pretrained first teacher scores every row once; each fold drops confident misses",
        "3": "(Q)LoRA teachers per fold from their post-pretrained adapters",
        "4": "teacher logits on each fold's training rows (both orders) and validation rows",
        "4.5": "calibration of the teacher logits, cross-fitted by fold",
        "5": "distillation into the student: CE + per teacher KL + cosine",
        "6": "fold adapters ensembled into one merged model",
        "7": "GPTQ 8-bit quantisation (quantize.enabled)",
        "8": "inference on the test rows",
        "8.5": "test-time augmentation: both A/B orders, swapped back and averaged (predict.tta)",
        "9": "evaluation: log loss, accuracy, ECE; the report"}


def numbered() -> list[tuple[str, Step]]:
    """(number, step) for every recipe number, in table order (a step that also does 8.5 is listed twice)."""
    return [(n, s) for s in RECIPE for n in (s.number, *s.also)]


def format_recipe() -> str:
    """The table as text: number, step, fan-out, GPU, what (`lmsys steps`)."""
    lines, said = [f"{'step':<5} {'name':<22} {'per':<12} {'gpu':<4} what"], set()
    for n, s in numbered():
        what = "" if n in said else WHAT[n]         # a number's text once, on its first step
        said.add(n)
        lines.append(f"{n:<5} {s.name:<22} {','.join(s.fan_out) or '-':<12} {'yes' if s.gpu else '-':<4} {what}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------- the graph of one run

def tasks_of(cfg: dict) -> list[tuple[str, dict]]:
    """The tasks of a run of `cfg` as (step, keys), in table order: optional steps follow
    params.yaml (demo data when data.train is null, calibrate / quantize / evaluate .enabled,
    predict unless data.test is none)."""
    fold_ids, teacher_names = folds.active_folds(cfg), teachers.teacher_names(cfg)
    skip = {"demo-data": not prepare.uses_demo(cfg), "calibrate": not cfg["calibrate"]["enabled"],
            "quantize": not cfg["quantize"]["enabled"], "evaluate": not cfg["evaluate"]["enabled"],
            "predict": skips_predict(cfg)}
    fan = {(): [{}], ("fold",): [{"fold": k} for k in fold_ids], ("model",): [{"model": m} for m in teacher_names],
           ("model", "fold"): [{"model": m, "fold": k} for m in teacher_names for k in fold_ids]}
    out = []
    for s in RECIPE:
        if skip.get(s.name):
            continue
        keys = [{"model": teachers.filter_model(cfg)}] if s.name == "filter-score" else fan[s.fan_out]   # once, not per teacher
        out += [(s.name, k) for k in keys]
    return out


def task_label(name: str, keys: dict) -> str:
    """A task's name: `train-teacher-fold0-modelllama` (the Prefect task and its records use it)."""
    return "-".join([name, *(f"{k}{v}" for k, v in sorted(keys.items()))])


def _writes(out, path) -> bool:
    return path == out or out in path.parents


def graph(cfg: dict) -> dict[str, list[str]]:
    """task label -> labels of the tasks it waits for: those whose outputs hold a path it reads."""
    layout = Layout.of(cfg)
    tasks = tasks_of(cfg)
    outs = {task_label(n, k): [p.resolve() for p in STEPS[n].outputs(cfg, layout, **k)] for n, k in tasks}
    deps = {}
    for n, k in tasks:
        me = task_label(n, k)
        ins = [p.resolve() for p in STEPS[n].inputs(cfg, layout, **k)]
        deps[me] = [t for t, os_ in outs.items() if t != me and any(_writes(o, p) for o in os_ for p in ins)]
    return deps


# ---------------------------------------------------------------- running one step

def run_step(name: str, cfg: dict, layout: Layout, **keys) -> StepResult:
    """Run step `name` on the part of `cfg` it declares (lmsys.config.for_step: reading any other key
    raises); on a GPU its metrics also get gpu_peak_gib (peak memory allocated by torch during the
    step; nothing is added on a CPU). A step of width > 1 (orchestration.step_gpus) runs as that many
    ranks (run_ranks). Raises KeyError for an unknown step."""
    if name not in STEPS:
        raise KeyError(f"unknown step {name!r}; known: {list(STEPS)}")
    n = ranks(cfg, name)
    if STEPS[name].gpu and shares_gpus(n):      # a job of more GPUs than the step: its own, in its own processes
        from lmsys.devices import claimed_devices
        with claimed_devices(n) as devices:
            return run_ranks(name, cfg, layout, keys, n, devices)
    if n > 1:
        return run_ranks(name, cfg, layout, keys, n)
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    result = STEPS[name].run(for_step(cfg, STEPS[name].params), layout, **keys)
    cuda = cuda or _cuda()                     # torch may have been imported (and CUDA started) by the step
    if cuda is not None:
        result.metrics = {**result.metrics, "gpu_peak_gib": cuda.max_memory_allocated() / 2**30}
    return result


def ranks(cfg: dict, name: str) -> int:
    """How many ranks step `name` runs as from here: its width (orchestration.step_gpus), at most the
    GPUs this process sees on CUDA (a job given fewer GPUs runs narrower, with a warning); 1 inside a
    rank. Raises ValueError for a width > 1 on a step that cannot run data-parallel."""
    n = distributed.step_width(cfg, name)
    if n == 1 or distributed.world() > 1:
        return 1
    if not STEPS[name].data_parallel:
        raise ValueError(f"orchestration.step_gpus.{name}={n}: step {name} runs in one process; data-parallel "
                         f"steps: {', '.join(s.name for s in RECIPE if s.data_parallel)}")
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        log.warning("%s: orchestration.step_gpus.%s=%d but this job sees %d GPU(s): running %d ranks", name, name, n,
                    torch.cuda.device_count(), torch.cuda.device_count())
        return torch.cuda.device_count()
    return n


def shares_gpus(n: int) -> bool:
    """Does this process (not a rank) see more GPUs than a step of n uses? Then other steps run beside it
    in the same job (orchestration.slurm.gpus_per_job > a step's width) and it must keep to its own."""
    if distributed.world() > 1:
        return False
    import torch
    return torch.cuda.is_available() and torch.cuda.device_count() > n


def run_ranks(name: str, cfg: dict, layout: Layout, keys: dict, n: int, devices: list[str] | None = None) -> StepResult:
    """Step `name` as n torch.distributed ranks (lmsys.distributed.launch; each runs run_rank) on
    `devices` (default the process's): rank 0's result, with `ranks` in its metrics. The ranks' logs are
    kept when one fails."""
    job_dir = layout.art / ".ranks" / task_label(name, keys)
    out = distributed.launch("lmsys.steps.recipe:run_rank", {"name": name, "cfg": cfg, "keys": keys}, n, job_dir,
                             devices=devices)
    shutil.rmtree(job_dir, ignore_errors=True)
    return StepResult(outputs=[Path(p) for p in out["outputs"]], metrics={**out["metrics"], "ranks": n})


def run_rank(job: dict) -> dict:
    """Inside one rank: the step, as one process would run it (the library splits the work)."""
    cfg = job["cfg"]
    result = run_step(job["name"], cfg, Layout.of(cfg), **job["keys"])
    return {"outputs": [str(p) for p in result.outputs], "metrics": result.metrics}


def _cuda():
    """torch.cuda when torch is already imported and CUDA is initialised, else None (no import here:
    listing or running CPU steps must not pay for torch)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None
