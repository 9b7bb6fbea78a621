"""CPU throughput benchmark: length-sorted per-batch padding vs the naive fixed padding.

For the tiny and small profiles' student and teacher, on two realistic length distributions
(the embedded demo data, and ../shared/data/vicuna80_human.csv), measures in one process:

  inference  lmsys.infer.predict_logits default (sort_by_length=True, each batch padded to its
             own longest row) vs the naive baseline (arrival order, every batch padded to
             max_length: sort_by_length=False, pad_to=max_length); samples/s and the ratio,
             plus the largest logit difference between the two (padding must not change results)
  training   lmsys.train.train_classifier for a few optimizer steps with its per-batch padding vs
             the same trainer with every micro-batch padded to max_length (lmsys.train.pad_batch
             patched with pad_to=max_length for the baseline run)
  padding    exact padded-token counts of both schemes over the whole encoded data set (no model:
             the compute a full pass would do, independent of timing noise)

Timings alternate fast/naive runs and keep the best of `--repeats`, to damp the noise of a shared
machine. A benchmark, not a test: nothing asserts a speed.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/cpu_inference.py [--quick] [--out benchmarks/results/cpu_inference.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lmsys import infer, models  # noqa: E402
from lmsys import train as trainer  # noqa: E402
from lmsys.config import load_config  # noqa: E402
from lmsys.data import demo  # noqa: E402
from lmsys.data.validate import validate_file  # noqa: E402
from lmsys.text import encode_rows, format_text  # noqa: E402

HERE = Path(__file__).resolve().parent
VICUNA = (HERE.parent / ".." / "shared" / "data" / "vicuna80_human.csv").resolve()


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())}


# ---------------------------------------------------------------- data

def datasets(tmp: Path, n_demo: int) -> dict[str, pd.DataFrame]:
    """Canonical tables: the demo competition's train.csv and vicuna80_human.csv."""
    paths = demo.make_demo_data(tmp / "demo", rows=n_demo, test_rows=1, external_rows=0, ut_rows=0, seed=0)
    out = {"demo": validate_file(paths["train"], source="kaggle").clean}
    if VICUNA.exists():
        out["vicuna80_human"] = validate_file(VICUNA, source="kaggle").clean
    return out


def padding_stats(lengths: np.ndarray, batch_size: int, max_length: int) -> dict:
    """Token positions computed by each scheme over the full set (real tokens = lengths.sum())."""
    srt = np.sort(lengths)[::-1]
    dyn = sum(int(srt[i:i + batch_size].max()) * len(srt[i:i + batch_size]) for i in range(0, len(srt), batch_size))
    fixed = len(lengths) * max_length
    real = int(lengths.sum())
    return {"rows": len(lengths), "tokens_mean": float(lengths.mean()), "tokens_median": float(np.median(lengths)),
            "tokens_p90": float(np.percentile(lengths, 90)), "share_at_max_length": float((lengths >= max_length).mean()),
            "computed_tokens_sorted": dyn, "computed_tokens_fixed": fixed, "real_tokens": real,
            "fixed_over_sorted": fixed / dyn}


# ---------------------------------------------------------------- timing

def time_inference(net, ids, pad_id, bs, L, repeats: int) -> dict:
    infer.predict_logits(net, ids[:bs], pad_id, bs)                      # warm-up (allocator, kernels)
    best = {"sorted": float("inf"), "naive": float("inf")}
    outs = {}
    for _ in range(repeats):
        for mode in ("sorted", "naive"):
            kw = {} if mode == "sorted" else {"sort_by_length": False, "pad_to": L}
            t0 = time.perf_counter()
            outs[mode] = infer.predict_logits(net, ids, pad_id, bs, **kw)
            best[mode] = min(best[mode], time.perf_counter() - t0)
    n = len(ids)
    return {"rows": n, "batch_size": bs, "max_length": L,
            "sorted_samples_per_s": n / best["sorted"], "naive_samples_per_s": n / best["naive"],
            "speedup": best["naive"] / best["sorted"],
            "max_abs_logit_diff": float(np.abs(outs["sorted"] - outs["naive"]).max())}


@contextlib.contextmanager
def fixed_padding(L: int):
    """The naive training baseline: every micro-batch padded to L (train.py imports pad_batch by name)."""
    orig = trainer.pad_batch
    trainer.pad_batch = lambda rows, pad_id: infer.pad_batch(rows, pad_id, L)
    try:
        yield
    finally:
        trainer.pad_batch = orig


def time_training(net, ids, labels, pad_id, L, bs, steps: int, repeats: int, tmp: Path) -> dict:
    """The same LoRA model keeps training across runs (throughput does not depend on the weights);
    every run sees the same rows (the trainer's seeded order)."""
    cfg = {"batch_size": bs, "grad_accum": 1, "lr": 1e-4, "warmup_steps": 0, "max_steps": steps,
           "eval_every": None, "checkpoint_every": None}
    trainer.train_classifier(net, ids, labels, tmp / "warmup", {**cfg, "max_steps": 1}, pad_id, seed=0)
    best = {"dynamic": 0.0, "fixed": 0.0}
    for r in range(repeats):
        for mode in ("dynamic", "fixed"):
            ctx = fixed_padding(L) if mode == "fixed" else contextlib.nullcontext()
            with ctx:
                m = trainer.train_classifier(net, ids, labels, tmp / f"train_{mode}_{r}", cfg, pad_id, seed=0)
            best[mode] = max(best[mode], m["samples_per_s"])
    return {"rows_per_run": steps * bs, "batch_size": bs, "steps": steps, "max_length": L,
            "dynamic_samples_per_s": best["dynamic"], "fixed_samples_per_s": best["fixed"],
            "speedup": best["dynamic"] / best["fixed"]}


# ---------------------------------------------------------------- per model

def bench_model(profile: str, name: str, role: str, data: dict[str, pd.DataFrame], tmp: Path, quick: bool) -> dict:
    cfg = load_config(profile)
    spec = {"name": name, "seed": cfg["seed"], **cfg["models"]["specs"][name]}
    L = cfg["text"]["infer_max_length"]
    Lt = cfg["text"]["train_max_length"]
    bs = cfg["predict"]["batch_size"] if role == "student" else cfg["teacher_logits"]["batch_size"]
    tbs = cfg["distill"]["batch_size"] if role == "student" else cfg["train_teacher"]["batch_size"]
    heavy = spec["kind"] == "gguf"
    n_infer = {True: 24, False: 128 if spec["kind"] == "pretrained" else 512}[heavy]
    steps = 2 if heavy else 4
    if quick:
        n_infer, steps = max(bs, n_infer // 4), 1
    repeats = 1 if heavy else 2

    tok_dir = tmp / f"tok_{profile}"
    if spec["kind"] in models.TINY_KINDS and not tok_dir.exists():
        texts = [format_text(p, a, b, cfg["text"]) for df in data.values()
                 for p, a, b in df[["prompt", "response_a", "response_b"]].itertuples(index=False)]
        models.train_tokenizer(texts, tok_dir, vocab_size=cfg["models"].get("tiny_vocab", 1024))
    tok = models.load_tokenizer(spec, tok_dir)
    t0 = time.perf_counter()
    net = models.build_model(spec, tok, trainable=True)   # LoRA; predict_logits puts it in eval mode
    load_s = time.perf_counter() - t0
    out = {"profile": profile, "model": name, "role": role, "kind": spec["kind"], "load_seconds": load_s,
           "parameters": sum(p.numel() for p in net.parameters()), "datasets": {}}
    for dname, df in data.items():
        ids = encode_rows(df, tok, L, cfg["text"])
        lengths = np.array([len(r) for r in ids])
        sample = np.random.default_rng(0).permutation(len(ids))[:n_infer]
        sub = [ids[i] for i in sample]
        res = {"padding_full_set": padding_stats(lengths, bs, L),
               "inference": time_inference(net, sub, tok.pad_token_id, bs, L, repeats)}
        res["inference"]["padding_of_timed_rows"] = padding_stats(lengths[sample], bs, L)
        out["datasets"][dname] = res
        logging.warning("%s/%s %s: inference sorted %.1f/s naive %.1f/s (x%.2f)", profile, name, dname,
                        res["inference"]["sorted_samples_per_s"], res["inference"]["naive_samples_per_s"],
                        res["inference"]["speedup"])
    for dname, df in data.items():
        tids = encode_rows(df, tok, Lt, cfg["text"])
        labels = df["label"].to_numpy(dtype=np.int64)
        res = time_training(net, tids, labels, tok.pad_token_id, Lt, tbs, steps, repeats, tmp / f"{profile}_{name}_{dname}")
        out["datasets"][dname]["training"] = res
        logging.warning("%s/%s %s: training dynamic %.1f/s fixed %.1f/s (x%.2f)", profile, name, dname,
                        res["dynamic_samples_per_s"], res["fixed_samples_per_s"], res["speedup"])
    del net
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_inference.json"))
    ap.add_argument("--quick", action="store_true", help="fewer rows and steps (smoke run)")
    ap.add_argument("--only", nargs="*", help="profile/model pairs to run, e.g. small/minilm")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "lmsys.infer", "lmsys.train"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.manual_seed(0)
    runs = [("tiny", "gemma", "student"), ("tiny", "llama", "teacher"),
            ("small", "minilm", "student"), ("small", "gemma3", "teacher")]
    if args.only:
        runs = [r for r in runs if f"{r[0]}/{r[1]}" in args.only]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmsys-bench-") as d:
        tmp = Path(d)
        data = datasets(tmp, n_demo=load_config("tiny")["demo"]["rows"])
        results = [bench_model(p, m, role, data, tmp, args.quick) for p, m, role in runs]
    report = {"benchmark": "cpu_inference", "machine": machine(), "quick": args.quick,
              "datasets": {k: len(v) for k, v in data.items()}, "seconds": time.perf_counter() - t0,
              "note": "best of repeats, fast and naive runs alternated in one process; speedup = naive time / fast time",
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(report))


def summary_table(report: dict) -> str:
    lines = ["| profile | model | data | infer L | inference sorted / naive (samples/s) | ratio | fixed/sorted padded tokens (full set) | train dynamic / fixed (samples/s) | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for d, v in r["datasets"].items():
            i, t, p = v["inference"], v.get("training", {}), v["padding_full_set"]
            lines.append(f"| {r['profile']} | {r['model']} ({r['role']}) | {d} | {i['max_length']} | "
                         f"{i['sorted_samples_per_s']:.1f} / {i['naive_samples_per_s']:.1f} | {i['speedup']:.2f}x | "
                         f"{p['fixed_over_sorted']:.2f}x | "
                         f"{t.get('dynamic_samples_per_s', float('nan')):.1f} / {t.get('fixed_samples_per_s', float('nan')):.1f} | "
                         f"{t.get('speedup', float('nan')):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
