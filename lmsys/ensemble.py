"""Fold ensemble of LoRA adapters (recipe step 6), merged into one full model.

Input: K adapter folders written by PeftModel.save_pretrained for a sequence-classification model
(LoraConfig task_type SEQ_CLS: lora_A/lora_B on the q/k/v/o/gate/up/down projections, and the
`score` head trained fully, which peft saves whole as a modules_to_save tensor). Saved keys look like
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
    base_model.model.score.weight                                    [3, hidden]
(Llama, Qwen2, Gemma2 alike). The math is done on these state dicts directly, because peft's
add_weighted_adapter refuses adapters with `score` in modules_to_save.

Methods (per LoRA module, W0 the base weight, s_k = alpha/r or alpha/sqrt(r) with rslora):
  mean      W0 + s * mean_k(B_k) @ mean_k(A_k): every adapter tensor averaged element-wise (the
            recipe's). Approximate: the cross terms B_j A_k (j != k) are not the mean of the deltas.
  exact     W0 + mean_k(s_k B_k A_k): the mean of the K merged models' weights, computed as one
            rank-K*r product, hstack_k(s_k B_k / K) @ vstack_k(A_k).
  weighted  W0 + sum_k w_k s_k B_k A_k, with w from fold_weights (all > 0, sum 1).
Full tensors (the score head) are averaged with the same weights (uniform for mean and exact).

Not supported (ValueError): DoRA, LoRA bias, fan_in_fan_out, alpha_pattern, embedding LoRA,
trainable tokens, non-LoRA peft types, folds with different key sets.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from lmsys.io import atomic_dir, write_json

METHODS = ("mean", "exact", "weighted")
PREFIX = "base_model.model."


def fold_weights(gains, tau: float = 1.0, floor: float = 1e-8) -> np.ndarray:
    """Fold weights [K] from gains r_k (fold k's log-likelihood gain over a baseline, measured on the
    same rows for every fold): advantages standardised within the group, A_k = (r_k - mean r) / std r,
    then w = softmax(A / tau). Standardising makes the weights depend on how the folds rank against
    each other, not on the gains' scale (gains of 0.01 nats would otherwise give weights within 1%
    of uniform); tau sets how sharply the better folds are preferred. Equal gains (std 0) give 1/K.
    No fold is discarded: weights are floored at `floor` and renormalised (every w_k > 0, sum 1).
    Raises ValueError on no gains, non-finite gains or tau <= 0."""
    r = np.asarray(gains, dtype=np.float64)
    if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError(f"gains must be a non-empty list of finite numbers, got {gains!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    std = r.std()
    if std <= 1e-12 * max(1.0, np.abs(r).max()):
        return np.full(r.size, 1.0 / r.size)
    adv = (r - r.mean()) / std / tau
    w = np.exp(adv - adv.max())          # [K], max-shifted softmax
    w = np.maximum(w / w.sum(), floor)
    return w / w.sum()


def fold_gain(probs, labels, baseline_probs) -> float:
    """Mean log p(y) - mean log p_baseline(y) on one fold's validation rows; probs [N, 3],
    labels [N], baseline_probs [N, 3] or [3] (e.g. the class prior). Clipped at 1e-15."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    b = np.broadcast_to(np.asarray(baseline_probs, dtype=np.float64), p.shape)
    rows = np.arange(len(y))
    return float(np.mean(np.log(np.clip(p[rows, y], 1e-15, 1)) - np.log(np.clip(b[rows, y], 1e-15, 1))))


# ---------------------------------------------------------------- reading adapters

def _check_config(cfg: dict, where) -> None:
    bad = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": bool(cfg.get("use_dora")),
           "lora_bias": bool(cfg.get("lora_bias")), "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
           "alpha_pattern": bool(cfg.get("alpha_pattern")), "bias": cfg.get("bias", "none") != "none",
           "trainable_token_indices": bool(cfg.get("trainable_token_indices"))}
    if any(bad.values()):
        raise ValueError(f"{where}: unsupported adapter settings {[k for k, v in bad.items() if v]}")


def read_adapter(adapter_dir) -> tuple[dict, dict, dict]:
    """One fold -> (lora, full, config). lora: base weight key -> (A [r, in], B [out, r], scale);
    full: base key -> tensor (modules_to_save copies, e.g. score.weight). Tensors in float32.
    Raises FileNotFoundError without adapter_config.json / adapter_model.safetensors, ValueError
    on unsupported settings or unknown keys."""
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    _check_config(cfg, d)
    sd = load_file(d / "adapter_model.safetensors")
    alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    pairs, full = {}, {}
    for key, t in sd.items():
        if not key.startswith(PREFIX) or "lora_embedding" in key or "lora_magnitude" in key:
            raise ValueError(f"{d}: unsupported adapter key {key!r}")
        rest = key[len(PREFIX):]
        for part in ("lora_A", "lora_B"):
            if f".{part}." in rest:
                module = rest.split(f".{part}.")[0]
                pairs.setdefault(module + ".weight", {})[part] = t.float()
                break
        else:   # a whole trained tensor; peft may spell it score.modules_to_save[.name].weight
            if ".original_module." not in rest:
                full[rest.replace(".modules_to_save", "")] = t.float()
    lora = {}
    for k, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise ValueError(f"{d}: {k} has only {sorted(p)}")
        r = p["lora_A"].shape[0]   # the tensor's rank, so rank_pattern needs no special case
        lora[k] = (p["lora_A"], p["lora_B"], alpha / (r ** 0.5 if rslora else r))
    return lora, full, cfg


# ---------------------------------------------------------------- the math

def _delta(parts: list[tuple], w: np.ndarray, method: str) -> torch.Tensor:
    """Merged weight delta [out, in] of one module from K (A_k [r, in], B_k [out, r], s_k)."""
    if method == "mean":
        A = torch.stack([a for a, _, _ in parts]).mean(0)      # [r, in]
        B = torch.stack([b for _, b, _ in parts]).mean(0)      # [out, r]
        scales = {s for _, _, s in parts}
        if len(scales) != 1:
            raise ValueError(f"method 'mean' needs equal LoRA scales across folds, got {scales}")
        return scales.pop() * B @ A
    A_cat = torch.cat([a for a, _, _ in parts], dim=0)                                  # [K*r, in]
    B_cat = torch.cat([float(wk) * s * b for wk, (_, b, s) in zip(w, parts)], dim=1)  # [out, K*r]
    return B_cat @ A_cat


def _weights(method: str, k: int, weights) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; supported: {METHODS}")
    if method != "weighted":
        if weights is not None:
            raise ValueError(f"method {method!r} takes no weights (use 'weighted')")
        return np.full(k, 1.0 / k)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is None or w.shape != (k,) or not np.all(w > 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"method 'weighted' needs {k} positive weights (see fold_weights), got {weights!r}")
    return w / w.sum()


def _to(parts: list[tuple], device: torch.device) -> list[tuple]:
    """(A, B, s) triples as float32 on `device` (adapters are read onto the CPU)."""
    return [(a.to(device, torch.float32), b.to(device, torch.float32), s) for a, b, s in parts]


def _merged(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + delta computed in float32 on the base's device, cast to `dtype`."""
    return (base.float() + delta.to(base.device, torch.float32)).to(dtype)


def _store(model: torch.nn.Module, sd: dict, key: str, value: torch.Tensor) -> None:
    """Write `value` as tensor `key`: in place when the dtypes agree, else as the parameter's new data
    (and dropped from `sd`, so the old tensor is freed)."""
    if value.dtype == sd[key].dtype:
        sd[key].copy_(value)
    else:
        model.get_parameter(key).data = value
        del sd[key]


@torch.no_grad()
def merge_into(model: torch.nn.Module, folds: list[tuple[dict, dict]], w: np.ndarray, method: str,
               dtype: torch.dtype | None = None) -> None:
    """Add each module's combined delta to the model's weights and overwrite the full tensors
    (score head) with their weighted mean, in place. The adapter tensors (CPU, as read_adapter
    returns them) go to each base weight's device; the merge is done in float32 there, so a bf16
    base on cuda (or any device, 'meta' included) merges where it lives. The result is cast to
    `dtype` (default: the base weight's), once: merged weights and the fp32-trained head from their
    float32 values, every other tensor from the base's own, so no weight is rounded twice (a head
    first rounded to a bf16 base and then to a float16 serving dtype would be).
    Raises ValueError on mismatched keys/shapes."""
    sd = model.state_dict()   # tensors share storage with the parameters
    lora0, full0 = folds[0]
    for i, (lora, full) in enumerate(folds[1:], 1):
        if set(lora) != set(lora0) or set(full) != set(full0):
            raise ValueError(f"fold {i} adapts other modules than fold 0: "
                             f"{sorted(set(lora) ^ set(lora0) | set(full) ^ set(full0))[:5]}")
    for key in lora0:
        if key not in sd:
            raise ValueError(f"adapter module {key!r} not in the base model")
        delta = _delta(_to([lora[key] for lora, _ in folds], sd[key].device), w, method)
        if delta.shape != sd[key].shape:
            raise ValueError(f"{key}: delta {tuple(delta.shape)} vs base {tuple(sd[key].shape)}")
        _store(model, sd, key, _merged(sd[key], delta, dtype or sd[key].dtype))
    for key in full0:
        if key not in sd or sd[key].shape != full0[key].shape:
            raise ValueError(f"adapter tensor {key!r} {tuple(full0[key].shape)} does not match the base model")
        avg = sum(float(wk) * full[key].float() for wk, (_, full) in zip(w, folds))     # fp32, on the CPU
        _store(model, sd, key, avg.to(sd[key].device, dtype or sd[key].dtype))
    if dtype is not None:
        model.to(dtype)          # the tensors not merged, each cast once from the base's dtype


def ensemble_adapters(base_model_factory: Callable[[], torch.nn.Module], adapter_dirs: list, out_dir,
                      method: str = "mean", weights=None, extra: dict | None = None, tokenizer=None,
                      dtype: torch.dtype | None = None, sidecars: dict[str, dict] | None = None) -> Path:
    """Combine K fold adapters (method mean | exact | weighted; weights [K] only for weighted) into
    a fresh base model from base_model_factory() and save it, atomically, as a full model in `dtype`
    (default: the base's; see merge_into: one cast) that
    AutoModelForSequenceClassification.from_pretrained(out_dir) loads, plus ensemble.json (method,
    weights, folds, base model, and `extra`) and a JSON file per entry of `sidecars` (file name ->
    content, e.g. serving.json). Returns out_dir. Raises ValueError on no adapters, a bad
    method/weights, or as read_adapter / merge_into."""
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise ValueError("no adapter folders")
    w = _weights(method, len(dirs), weights)
    read = [read_adapter(d) for d in dirs]
    model = base_model_factory()
    merge_into(model, [(lora, full) for lora, full, _ in read], w, method, dtype)
    meta = {"method": method, "weights": w.tolist(), "folds": [str(d) for d in dirs],
            "base_model": read[0][2].get("base_model_name_or_path"),
            "lora_modules": len(read[0][0]), "full_tensors": sorted(read[0][1]), **(extra or {})}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:          # beside the weights, so the dir loads on its own
            tokenizer.save_pretrained(tmp)
        write_json(meta, tmp / "ensemble.json")
        for name, content in (sidecars or {}).items():
            write_json(content, tmp / name)
    return Path(out_dir)
