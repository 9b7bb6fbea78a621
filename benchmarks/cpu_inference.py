"""CPU throughput benchmark: length-sorted per-batch padding vs the naive fixed padding.

For the tiny and small profiles' student and teacher, on two realistic length distributions
(the embedded demo data, and ../shared/data/vicuna80_human.csv), measures in one process:

  inference  lmsys.infer.predict_logits default (sort_by_length=True, each batch padded to its
             own longest row) vs the naive baseline (arrival order, every batch padded to
             max_length: sort_by_length=False, pad_to=max_length); samples/s and the ratio,
             plus the largest logit difference between the two (padding must not change results)
  training   lmsys.train.train_classifier for a few optimizer steps with its per-batch padding vs
             the same trainer with every micro-batch padded to max_length (its pad_to argument)
  padding    exact padded-token counts of both schemes over the whole encoded data set (no model:
             the compute a full pass would do, independent of timing noise)

The machine is shared (2 cores, other jobs at higher priority), so wall time mostly measures the
neighbours. The primary figure is therefore samples per CPU-second of this process with torch on
one thread (`--threads 1`, time.process_time): the intrinsic cost, insensitive to contention; wall
samples/s are recorded next to it. Fast and naive runs alternate and the best of the repeats is
kept. A benchmark, not a test: nothing asserts a speed.

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
from lmsys.train import TrainSet, train_classifier  # noqa: E402
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
    cpu = {"sorted": float("inf"), "naive": float("inf")}
    wall = dict(cpu)
    outs = {}
    for _ in range(repeats):
        for mode in ("sorted", "naive"):
            kw = {} if mode == "sorted" else {"sort_by_length": False, "pad_to": L}
            c0, t0 = time.process_time(), time.perf_counter()
            outs[mode] = infer.predict_logits(net, ids, pad_id, bs, **kw)
            cpu[mode] = min(cpu[mode], time.process_time() - c0)
            wall[mode] = min(wall[mode], time.perf_counter() - t0)
    n = len(ids)
    return {"rows": n, "batch_size": bs, "max_length": L,
            "sorted_samples_per_cpu_s": n / cpu["sorted"], "naive_samples_per_cpu_s": n / cpu["naive"],
            "speedup": cpu["naive"] / cpu["sorted"],
            "sorted_samples_per_wall_s": n / wall["sorted"], "naive_samples_per_wall_s": n / wall["naive"],
            "speedup_wall": wall["naive"] / wall["sorted"],
            "max_abs_logit_diff": float(np.abs(outs["sorted"] - outs["naive"]).max())}


def time_training(net, ids, labels, pad_id, L, bs, steps: int, repeats: int, tmp: Path) -> dict:
    """The same LoRA model keeps training across runs (throughput does not depend on the weights);
    every run sees the same rows (the trainer's seeded order)."""
    from lmsys.settings import TrainerSettings
    settings = TrainerSettings(epochs=1, batch_size=bs, grad_accum=1, lr=1e-4, warmup_steps=0, max_steps=steps,
                               eval_every=None, checkpoint_every=None, packing=False, pack_tokens=4096)
    rows = TrainSet(ids, labels, pad_id)
    train_classifier(net, rows, out_dir=tmp / "warmup", settings=settings.model_copy(update={"max_steps": 1}), seed=0)
    cpu = {"dynamic": float("inf"), "fixed": float("inf")}
    wall = dict(cpu)
    for r in range(repeats):
        for mode in ("dynamic", "fixed"):
            c0 = time.process_time()
            m = train_classifier(net, rows, out_dir=tmp / f"train_{mode}_{r}", settings=settings, seed=0,
                                 pad_to=L if mode == "fixed" else None)
            cpu[mode] = min(cpu[mode], time.process_time() - c0)   # includes the small final adapter save
            wall[mode] = min(wall[mode], m["train_seconds"])
    n = steps * bs
    return {"rows_per_run": n, "batch_size": bs, "steps": steps, "max_length": L,
            "dynamic_samples_per_cpu_s": n / cpu["dynamic"], "fixed_samples_per_cpu_s": n / cpu["fixed"],
            "speedup": cpu["fixed"] / cpu["dynamic"],
            "dynamic_samples_per_wall_s": n / wall["dynamic"], "fixed_samples_per_wall_s": n / wall["fixed"],
            "speedup_wall": wall["fixed"] / wall["dynamic"]}


# ---------------------------------------------------------------- per model

def bench_model(profile: str, name: str, role: str, data: dict[str, pd.DataFrame], tmp: Path, quick: bool) -> dict:
    cfg = load_config(profile)
    spec = {"name": name, "seed": cfg["seed"], **cfg["models"]["specs"][name]}
    L = cfg["text"]["infer_max_length"]
    Lt = cfg["text"]["train_max_length"]
    bs = cfg["predict"]["batch_size"] if role == "student" else cfg["teacher_logits"]["batch_size"]
    tbs = cfg["distill"]["batch_size"] if role == "student" else cfg["train_teacher"]["batch_size"]
    tiny = spec["kind"] in models.TINY_KINDS
    n_infer = {"gguf": 16, "pretrained": 64}.get(spec["kind"], 256)
    steps = 2 if spec["kind"] == "gguf" else 4
    if quick:
        n_infer, steps = max(bs, n_infer // 4), 1
    repeats = 2 if tiny else 1
    full_text = load_config("full")["text"]

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
        # the full profile's lengths (train 1024 / infer 2000): where sorting pays on real data
        for Lf in (full_text["train_max_length"], full_text["infer_max_length"]):
            long_ids = encode_rows(df, tok, Lf, full_text)
            res[f"padding_full_set_L{Lf}"] = padding_stats(np.array([len(r) for r in long_ids]), bs, Lf)
            if tiny and Lf == full_text["infer_max_length"]:   # only the tiny models take 2000 positions cheaply
                sub_long = [long_ids[i] for i in sample[: max(8, n_infer // 8)]]
                res[f"inference_L{Lf}"] = time_inference(net, sub_long, tok.pad_token_id, 8, Lf, 1)
        out["datasets"][dname] = res
        logging.warning("%s/%s %s: inference sorted %.1f naive %.1f samples/cpu-s (x%.2f)", profile, name, dname,
                        res["inference"]["sorted_samples_per_cpu_s"], res["inference"]["naive_samples_per_cpu_s"],
                        res["inference"]["speedup"])
    for dname, df in data.items():
        tids = encode_rows(df, tok, Lt, cfg["text"])
        labels = df["label"].to_numpy(dtype=np.int64)
        res = time_training(net, tids, labels, tok.pad_token_id, Lt, tbs, steps, repeats, tmp / f"{profile}_{name}_{dname}")
        out["datasets"][dname]["training"] = res
        logging.warning("%s/%s %s: training dynamic %.1f fixed %.1f samples/cpu-s (x%.2f)", profile, name, dname,
                        res["dynamic_samples_per_cpu_s"], res["fixed_samples_per_cpu_s"], res["speedup"])
    del net
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_inference.json"))
    ap.add_argument("--quick", action="store_true", help="fewer rows and steps (smoke run)")
    ap.add_argument("--only", nargs="*", help="profile/model pairs to run, e.g. small/minilm")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = compute)")
    ap.add_argument("--md-only", action="store_true", help="only rewrite RESULTS.md from --out")
    args = ap.parse_args()
    if args.md_only:
        update_results_md("inference", markdown(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "lmsys.infer", "lmsys.train"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.manual_seed(0)
    runs = [("tiny", "gemma", "student"), ("small", "minilm", "student"), ("small", "gemma3", "teacher"),
            ("tiny", "llama", "teacher")]
    if not args.only:
        runs = runs[:3]        # default: both students and the small profile's (real) teacher
    else:
        runs = [r for r in runs if f"{r[0]}/{r[1]}" in args.only]
    t0, mach = time.perf_counter(), machine()
    with tempfile.TemporaryDirectory(prefix="lmsys-bench-") as d:
        tmp = Path(d)
        data = datasets(tmp, n_demo=load_config("tiny")["demo"]["rows"])
        results = [bench_model(p, m, role, data, tmp, args.quick) for p, m, role in runs]
    report = {"benchmark": "cpu_inference", "machine": mach, "quick": args.quick,
              "datasets": {k: len(v) for k, v in data.items()}, "seconds": time.perf_counter() - t0,
              "load_avg_at_end": list(os.getloadavg()),
              "note": "samples per CPU-second of this process (torch threads as in machine.torch_threads) are the primary "
                      "figures, wall samples/s are contended by other jobs on the shared machine; best of repeats, fast and naive runs alternated in one process; speedup = naive time / fast time",
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    update_results_md("inference", markdown(report))
    print(summary_table(report))


RESULTS_MD = HERE / "RESULTS.md"
CPU_SECTION = "## CPU (this machine)"


def update_results_md(part: str, text: str, path: Path = RESULTS_MD) -> None:
    """Put `text` between <!-- cpu:part --> markers inside the "CPU (this machine)" section of
    RESULTS.md, creating the section (appended at the end) or the part as needed. Other sections
    (the GPU one) are left untouched."""
    start, end = f"<!-- cpu:{part} -->", f"<!-- /cpu:{part} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in doc and end in doc:
        doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
    elif CPU_SECTION in doc:
        i = doc.index(CPU_SECTION) + len(CPU_SECTION)
        nxt = doc.find("\n## ", i)                        # end of the CPU section
        nxt = len(doc) if nxt < 0 else nxt
        doc = doc[:nxt].rstrip("\n") + "\n\n" + block + "\n" + doc[nxt:]
    else:
        doc = doc.rstrip("\n") + f"\n\n{CPU_SECTION}\n\n" + block + "\n"
    path.write_text(doc)


def markdown(report: dict) -> str:
    m = report["machine"]
    return "\n".join([
        "### Inference and training throughput: length-sorted per-batch padding vs fixed padding",
        "",
        f"`python benchmarks/cpu_inference.py` -> `benchmarks/results/cpu_inference.json`. Machine: {m['cpu']}, "
        f"{m['cores']} cores shared with other jobs (load average {report['machine']['load_avg_at_start'][0]:.1f} at the start, "
        f"{report['load_avg_at_end'][0]:.1f} at the end), torch {m['torch']} on {m['torch_threads']} thread, nice 10. "
        "Figures are samples per CPU-second of the benchmark process (robust to the neighbours); the wall-time ratio "
        "is in brackets. 'sorted' = `predict_logits` default (longest first, each batch padded to its longest row); "
        "'naive' = `sort_by_length=False, pad_to=max_length`. Training: `train_classifier`'s per-batch padding vs every "
        "micro-batch padded to max_length (random batches, no sorting in either). Fresh LoRA adapters: speed only.",
        "",
        summary_table(report),
        "",
        reading(report),
    ])


def reading(report: dict) -> str:
    """Plain-words reading of the figures (computed, so it stays true on a rerun)."""
    rows = [(r, d, v) for r in report["results"] for d, v in r["datasets"].items()]
    sat = {d: v["padding_full_set"]["share_at_max_length"] for r, d, v in rows if r["profile"] == "small"}
    inf = [v["inference"]["speedup"] for _, _, v in rows]
    trn = [v["training"]["speedup"] for _, _, v in rows if "training" in v]
    long_ = {f"{r['model']}/{d}": v["inference_L2000"]["speedup"] for r, d, v in rows if "inference_L2000" in v}
    pad2k = [v["padding_full_set_L2000"]["fixed_over_sorted"] for r, d, v in rows if r["kind"] != "tiny-gemma2"
             and "padding_full_set_L2000" in v]
    diff = max(v[k]["max_abs_logit_diff"] for _, _, v in rows for k in v if k.startswith("inference"))
    return (
        "Reading: at the tiny and small profiles' own lengths (256/384 tokens) the texts fill the window "
        f"({', '.join(f'{100 * x:.0f}% of {d}' for d, x in sat.items())} rows reach 256 tokens), so sorting buys "
        f"{min(inf):.2f}x-{max(inf):.2f}x in inference (the most on the demo data, nothing on vicuna80) and per-batch "
        f"padding in training (random batches, no sorting) {min(trn):.2f}x-{max(trn):.2f}x, i.e. noise. The gain is a long-context one: at the full "
        f"profile's 2000 tokens the real tokenizers (MiniLM, Gemma 3) would compute {min(pad2k):.1f}x-{max(pad2k):.1f}x "
        f"fewer padded positions sorted than fixed, and the tiny model timed at 2000 tokens ran "
        f"{', '.join(f'{v:.1f}x ({k})' for k, v in long_.items())} faster sorted (attention grows faster than "
        f"linearly in the padded length). Sorted and naive logits agree to {diff:.1e} (padding does not change results). "
        "MiniLM cannot take 2000 positions (512 max), the Gemma 3 270M teacher at 2000 is too slow to time here.")


def summary_table(report: dict) -> str:
    lines = ["| profile | model | data | L infer/train | inference sorted / naive (samples per CPU-s) | ratio (wall ratio) | fixed/sorted padded tokens, full set | training per-batch / fixed padding (samples per CPU-s) | ratio (wall ratio) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for d, v in r["datasets"].items():
            i, t, p = v["inference"], v.get("training", {}), v["padding_full_set"]
            lines.append(f"| {r['profile']} | {r['model']} ({r['role']}) | {d} | {i['max_length']}/{t.get('max_length')} | "
                         f"{i['sorted_samples_per_cpu_s']:.1f} / {i['naive_samples_per_cpu_s']:.1f} | "
                         f"{i['speedup']:.2f}x ({i['speedup_wall']:.2f}x) | {p['fixed_over_sorted']:.2f}x | "
                         f"{t['dynamic_samples_per_cpu_s']:.1f} / {t['fixed_samples_per_cpu_s']:.1f} | "
                         f"{t['speedup']:.2f}x ({t['speedup_wall']:.2f}x) |")
            for key in [k for k in v if k.startswith("inference_L")]:
                i, Lf = v[key], key.split("_L")[1]
                p = v[f"padding_full_set_L{Lf}"]
                lines.append(f"| {r['profile']} | {r['model']} ({r['role']}) | {d} | {Lf}/- | "
                             f"{i['sorted_samples_per_cpu_s']:.1f} / {i['naive_samples_per_cpu_s']:.1f} | "
                             f"{i['speedup']:.2f}x ({i['speedup_wall']:.2f}x) | {p['fixed_over_sorted']:.2f}x | - | - |")
    lines += ["", "Padded-token ratio fixed/sorted over the whole set at the full profile's lengths (no timing):", "",
              "| model (tokenizer) | data | L=1024 | L=2000 | median tokens at L=2000 |", "|---|---|---|---|---|"]
    for r in report["results"]:
        for d, v in r["datasets"].items():
            a, b = v.get("padding_full_set_L1024"), v.get("padding_full_set_L2000")
            if a and b:
                lines.append(f"| {r['profile']}/{r['model']} | {d} | {a['fixed_over_sorted']:.2f}x | "
                             f"{b['fixed_over_sorted']:.2f}x | {b['tokens_median']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
