"""Padding-free training against padded micro-batches, on the recipe's Kaggle-like lengths (issue 19 item 1).

    python benchmarks/packed_training.py [--profile full] [--rows 6400] [--time-rows 128] [--arch tiny-llama]
                                         [--packs 4096,1024] [--threads 1]

Lengths: lmsys.token_model's log-normal through the profile's competition median and p90 (full: 589 and
1,240 tokens, docs/recipe.md), cut at its text.train_max_length (full: 1,024), as `lmsys plan` prices
them. The trainer's settings are the profile's distill section (full: batch_size 4, grad_accum 16, a
step of 64 rows, pack_tokens 4096); --packs (default: its pack_tokens and the cut) are the pack sizes timed.

1. Real tokens per computed token of the trainer's own micro-batches over one epoch of --rows rows
   (lmsys.train.PaddedBatches / PackedBatches over epoch_groups): padded; packed as a GPU computes it
   (flex attention: every pack rounded up to its 128-token block; the same packs); packed on a CPU
   (no rounding: computed = real).
2. CPU time (this process's, so other load on the machine counts less than in wall time; wall printed
   too) of one training epoch (forward, backward, AdamW) of a tiny model (--arch, hidden 64, 2 layers,
   LoRA r 8) on --time-rows rows of those lengths (random token ids): padded, and packed at each of
   --packs; in one process, the runs alternated, the best of 2 each, and the ratios packed / padded. On a CPU the packed mask is dense (transformers' packed-sequence path), so attention
   costs pack length squared; a tiny model's FLOPs are mostly attention, so this prices the CPU path,
   not the GPU's flex path (block-sparse: it skips the blocks between rows).

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from lmsys import token_model
from lmsys.config import load_config
from lmsys.models import build_model, train_tokenizer
from lmsys.settings import TrainerSettings
from lmsys.train import PackedBatches, PaddedBatches, TrainSet, epoch_groups, train_classifier

VOCAB = 300


def plan_lengths(cfg: dict, n: int) -> tuple[np.ndarray, dict]:
    """n training-row lengths as the plan draws them for the profile's competition rows."""
    t = cfg["orchestration"]["estimate"]["tokens"]["competition"]
    cap = cfg["text"]["train_max_length"]
    lengths = token_model.lengths(float(t["median"]), float(t["p90"]), cap)[:n]
    return np.asarray(lengths), {"median": t["median"], "p90": t["p90"], "cap": cap, "source": t["source"]}


def trainer_efficiency(model, rows: TrainSet, bs: int, accum: int, pack_tokens: int) -> dict:
    """Real / computed tokens of one epoch of the trainer's micro-batches, padded and packed."""
    lengths = np.array([len(r) for r in rows.ids])
    padded, packed = PaddedBatches(model, rows, "cpu"), PackedBatches(model, rows, "cpu", pack_tokens)
    real = computed_padded = computed_cpu = computed_flex = 0
    for group in epoch_groups(len(lengths), 0, 0, bs, accum):
        step = np.concatenate(group)
        real += int(lengths[step].sum())
        computed_padded += sum(padded.computed_tokens(b) for b in padded.split(group))
        packs = packed.split(group)
        computed_cpu += sum(packed.computed_tokens(p) for p in packs)
        computed_flex += sum(-(-int(lengths[p].sum()) // token_model.FLEX_BLOCK) * token_model.FLEX_BLOCK for p in packs)
    return {"real_tokens": real, "padded": real / computed_padded, "packed_gpu_flex": real / computed_flex,
            "packed_cpu": real / computed_cpu, "plan_padded": token_model.padded_efficiency(lengths, bs),
            "plan_packed": token_model.packed_efficiency(lengths, bs * accum, pack_tokens)}


def epoch_seconds(arch: str, tok, rows: TrainSet, settings: TrainerSettings, out: str) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one training epoch."""
    spec = {"kind": arch, "hidden": 64, "layers": 2, "heads": 4, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    model = build_model(spec, tok)
    c0, t0 = time.process_time(), time.perf_counter()
    train_classifier(model, rows, out_dir=out, settings=settings, seed=0, desc="bench")
    return time.process_time() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="full")
    ap.add_argument("--packs", default=None, help="pack sizes to time, comma-separated")
    ap.add_argument("--rows", type=int, default=6400)
    ap.add_argument("--time-rows", type=int, default=128)
    ap.add_argument("--arch", default="tiny-llama", choices=["tiny-llama", "tiny-qwen2", "tiny-gemma2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/lmsys-bench-packed-training")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    cfg = load_config(a.profile)
    d = cfg["distill"]
    bs, accum, pack_tokens = int(d["batch_size"]), int(d["grad_accum"]), int(d["pack_tokens"])
    packs = [int(x) for x in a.packs.split(",")] if a.packs else \
        list(dict.fromkeys([pack_tokens, int(cfg["text"]["train_max_length"])]))
    lengths, source = plan_lengths(cfg, a.rows)
    tok = train_tokenizer([" ".join(map(str, rng.integers(0, 99, 30))) for _ in range(50)], f"{a.out}/tok", VOCAB)
    ids = [[1] + rng.integers(7, VOCAB, size=int(n) - 1).tolist() for n in lengths]
    rows = TrainSet(ids, rng.integers(0, 3, size=len(ids)), tok.pad_token_id)
    probe = build_model({"kind": a.arch, "hidden": 64, "layers": 2, "heads": 4}, tok)
    efficiency = trainer_efficiency(probe, rows, bs, accum, pack_tokens)

    small = TrainSet(ids[:a.time_rows], rows.labels[:a.time_rows], tok.pad_token_id)
    base = dict(epochs=1, lr=1e-3, warmup_steps=0, batch_size=bs, grad_accum=accum, max_steps=None, eval_every=None,
                checkpoint_every=None)
    runs = {"padded": TrainerSettings(**base, packing=False, pack_tokens=pack_tokens),
            **{f"packed_{n}": TrainerSettings(**base, packing=True, pack_tokens=n) for n in packs}}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(2):
        for name, s in runs.items():
            c, w = epoch_seconds(a.arch, tok, small, s, f"{a.out}/{name}-{rep}")
            cpu[name].append(c)
            wall[name].append(w)
    best = {k: min(v) for k, v in cpu.items()}
    print(json.dumps({
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{a.threads} thread(s)",
        "profile": a.profile, "trainer": {"batch_size": bs, "grad_accum": accum, "pack_tokens": pack_tokens},
        "lengths": {**source, "rows": a.rows, "mean": float(lengths.mean()), "at_cap": float((lengths == source["cap"]).mean())},
        "real_per_computed_token": efficiency,
        "cpu_epoch": {"arch": a.arch, "rows": a.time_rows, "cpu_seconds": cpu, "wall_seconds": wall, "best_cpu": best,
                      **{f"ratio_packed_{n}": best[f"packed_{n}"] / best["padded"] for n in packs}}}))


if __name__ == "__main__":
    main()
