"""Step 7: GPTQ post-training quantisation of the merged student classifier.

The route is transformers' `GPTQConfig` + `AutoModelForSequenceClassification.from_pretrained`
with the gptqmodel backend (optimum drives it). gptqmodel's own loader is not used: it treats a
classification checkpoint as a causal LM and drops the `score` head. Only the linear layers inside
the decoder blocks are quantised; embeddings, norms and the `score` head stay in full precision.

Supported: Llama / Qwen2 / Gemma2 sequence classifiers saved as config.json + safetensors with
their tokenizer in the same directory; bits 2, 3, 4, 8; CPU or CUDA when available. Nothing is compiled
here: gptqmodel's C++/CUDA helpers are switched to their Python fallbacks (lmsys.kernels.forbid_builds)
and the kernel is one that needs no build (lmsys.kernels.choose_backend picks it per device).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from lmsys.io import atomic_dir, write_json
from lmsys.kernels import forbid_builds

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
HEAD_NAME = "score"
METRICS_FILE = "quantize.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
PROBE_TEXTS = 4          # calibration texts reused as a forward-pass sanity probe
PROBE_MAX_TOKENS = 128   # the probe only checks finiteness and drift; short is enough
SIDECARS = ("serving.json", "ensemble.json")   # what describes the model dir (dtype, folds, class prior): carried over

EvalFn = Callable[[torch.nn.Module, object], float]


# ---------------------------------------------------------------- checks

def require_gptq_backend() -> None:
    """Raise ImportError with an install hint when gptqmodel or optimum is missing."""
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"GPTQ quantisation needs {' and '.join(missing)}: "
            "pip install gptqmodel==7.6.0 optimum==2.3.0 (pin torch with a constraints file; "
            "gptqmodel 7.7+ pulls a CUDA torch)")


def _check_args(bits: int, group_size: int, texts: list[str], model_seqlen: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size={group_size!r}: expected a positive int or -1 (per channel)")
    if not texts:
        raise ValueError("GPTQ needs calibration texts; got none")
    if model_seqlen <= 0:
        raise ValueError(f"model_seqlen={model_seqlen!r} must be positive")


# ---------------------------------------------------------------- group size

def _quantized_in_features(config) -> set[int]:
    """Input widths of the block linears GPTQ groups over: hidden (q/k/v/gate/up),
    heads*head_dim (o_proj; differs from hidden in Gemma2) and intermediate (down_proj)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {hidden, heads * head_dim, cfg.intermediate_size}


def resolve_group_size(config, group_size: int) -> int:
    """`group_size` if it divides every quantised input width (or is -1, per channel); otherwise the
    largest power of two <= group_size that does (tiny test models have hidden 64, so 128 -> 64)."""
    widths = _quantized_in_features(config)
    if group_size == -1 or all(w % group_size == 0 for w in widths):
        return group_size
    g = 1 << (group_size.bit_length() - 1)  # largest power of two <= group_size
    while any(w % g for w in widths):
        g //= 2
    log.warning("group_size %d does not divide the layer widths %s; using %d", group_size, sorted(widths), g)
    return g


# ---------------------------------------------------------------- helpers

def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weights_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)) / 2**20


def _calibration_dataset(tok, texts: list[str], seqlen: int) -> list[dict]:
    """Texts tokenised and truncated to `seqlen` here, because optimum tokenises a list of strings
    without truncation (a long chat would calibrate at its full length). Nested int lists: optimum
    makes [1, L] LongTensors of them."""
    enc = [tok(t, truncation=True, max_length=seqlen) for t in texts]
    return [{"input_ids": [e["input_ids"]], "attention_mask": [e["attention_mask"]]} for e in enc]


@torch.no_grad()
def _probe_logits(model, tok, texts: list[str]) -> torch.Tensor:
    """Logits of `model` on a few short texts, on the CPU in fp32, for finiteness/drift checks."""
    enc = tok(texts[:PROBE_TEXTS], truncation=True, max_length=PROBE_MAX_TOKENS, padding=True,
              return_tensors="pt")
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu()


def _head_weights(model) -> dict[str, torch.Tensor]:
    """The score head's tensors (CPU copies); raises ValueError when the model has no `score` head."""
    head = getattr(model, HEAD_NAME, None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no Linear `{HEAD_NAME}` head")
    return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}


def _load_reference(model_dir: Path, device: torch.device, dtype: str | torch.dtype = "auto"):
    from transformers import AutoModelForSequenceClassification
    from lmsys.models import device_map
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype,
                                                               device_map=device_map(device))
    return model.eval()


# ---------------------------------------------------------------- public API

def load_quantized(out_dir: str | Path, device: str | torch.device | None = None, backend: str | None = None,
                   dtype: str | torch.dtype = "auto"):
    """A frozen eval-mode GPTQ classifier from `out_dir`, placed on `device` (default: cuda when
    available, else cpu), its unquantised tensors in `dtype` ("auto": as saved; a GPTQ model cannot be
    cast after loading). device_map is what places a GPTQ model: `.to(device)` after loading
    leaves gptqmodel's kernels where they were selected. `backend` (a gptqmodel kernel name, e.g.
    "gptq_triton", "gptq_torch"; None: the one quantize.json records, else "auto") picks the
    kernel: choose one with lmsys.kernels.choose_backend ("auto" on Hopper is Marlin, whose CUDA
    extension gptqmodel would compile on first use: over 5 min on an H200).

    Raises FileNotFoundError without config.json, ValueError when the checkpoint is not GPTQ,
    ImportError when the backend is missing."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        raise FileNotFoundError(f"{out_dir} has no config.json")
    qcfg = getattr(AutoConfig.from_pretrained(str(out_dir)), "quantization_config", None) or {}
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    if str(getattr(method, "value", method)) != "gptq":
        raise ValueError(f"{out_dir} is not a GPTQ checkpoint (quant_method={method!r})")
    require_gptq_backend()
    forbid_builds()
    device = torch.device(device) if device is not None else _default_device()
    override = {}
    recorded = out_dir / METRICS_FILE
    if backend is None and recorded.exists():
        backend = json.loads(recorded.read_text()).get("backend")
    if backend is not None:                 # a loading attribute: merged into the saved GPTQ config
        from transformers import GPTQConfig
        saved = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
        override["quantization_config"] = GPTQConfig.from_dict({**saved, "backend": backend})
    model = AutoModelForSequenceClassification.from_pretrained(
        str(out_dir), dtype=dtype, device_map={"": str(device)}, **override)
    model.requires_grad_(False)
    return model.eval()


def quantize_gptq(model_dir: str | Path, out_dir: str | Path, texts: list[str], bits: int = 8,
                  group_size: int = 128, model_seqlen: int = 2100, eval_fn: EvalFn | None = None,
                  device: str | torch.device | None = None, backend: str = "auto",
                  dtype: str | torch.dtype = "auto") -> dict:
    """GPTQ-quantise the merged classifier at `model_dir` (its tokenizer beside it) into `out_dir`.

    Calibrates on `texts` (each truncated to model_seqlen tokens). The quantised model and the
    tokenizer are staged in a temp dir, reloaded from there with `load_quantized` (the path
    inference uses) and checked: `score` head bit-identical to the unquantised one, probe logits
    finite. Only then, with quantize.json written, does the dir replace `out_dir` whole, so a
    failed or killed run never leaves a half-checked `out_dir`.

    `backend`: the gptqmodel kernel the quantised model runs with (see `load_quantized`); saved
    with the checkpoint and used for the reload check. `dtype`: of the unquantised tensors (embeddings,
    norms, the `score` head) and of the computation ("auto": model_dir's own, which step 6 wrote in the
    serving target's dtype). The files of SIDECARS in model_dir (serving.json, ensemble.json) are copied
    beside it.

    Returns metrics: bits, backend, group_size (used), group_size_requested, group_size_fallback,
    n_calibration, log_loss_unquantized / log_loss_quantized / log_loss_change (eval_fn(model, tok)
    on both models; None without eval_fn), max_abs_logit_diff (probe), quantize_seconds,
    reload_seconds, first_call_seconds (the reloaded model's first forward, the probe: where Triton
    compiles its kernels), dtype, size_mb_before, size_mb_after (weight files).

    Raises ValueError for bits not in (2, 3, 4, 8), a bad group_size, no texts or a model
    without a `score` head; ImportError when gptqmodel/optimum are missing; RuntimeError when
    the reloaded model fails a check."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPTQConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_args(bits, group_size, texts, model_seqlen)
    require_gptq_backend()
    forbid_builds()
    device = torch.device(device) if device is not None else _default_device()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:  # the probe pads a small batch
        tok.pad_token = tok.eos_token

    # The unquantised reference: head weights, probe logits, eval loss. Freed before quantising
    # so a large model is never held twice.
    ref = _load_reference(model_dir, device, dtype)
    used_group = resolve_group_size(ref.config, group_size)
    head_before = _head_weights(ref)
    probe_before = _probe_logits(ref, tok, texts)
    loss_before = float(eval_fn(ref, tok)) if eval_fn is not None else None
    del ref

    qconfig = GPTQConfig(bits=bits, group_size=used_group, dataset=_calibration_dataset(tok, texts, model_seqlen),
                         tokenizer=tok, model_seqlen=model_seqlen, backend=backend)
    t0 = time.perf_counter()
    from lmsys.models import device_map     # straight onto the device (transformers' GPTQ default is the host)
    qmodel = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype,
                                                                quantization_config=qconfig,
                                                                device_map=device_map(device))
    quantize_seconds = time.perf_counter() - t0
    # optimum copies the calibration set into the saved config: drop it (training rows, and large).
    qmodel.config.quantization_config.dataset = None

    with atomic_dir(out_dir) as stage:
        qmodel.save_pretrained(stage)
        tok.save_pretrained(stage)
        for name in SIDECARS:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, stage / name)
        del qmodel
        t0 = time.perf_counter()
        reloaded = load_quantized(stage, device, backend, dtype)
        reload_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe_after = _verify(reloaded, tok, texts, head_before)
        first_call_seconds = time.perf_counter() - t0
        loss_after = float(eval_fn(reloaded, tok)) if eval_fn is not None else None
        metrics = {
            "bits": bits, "backend": backend, "group_size": used_group, "group_size_requested": group_size,
            "group_size_fallback": used_group != group_size, "n_calibration": len(texts),
            "log_loss_unquantized": loss_before, "log_loss_quantized": loss_after,
            "log_loss_change": None if eval_fn is None else loss_after - loss_before,
            "max_abs_logit_diff": float((probe_after - probe_before).abs().max()),
            "quantize_seconds": quantize_seconds, "reload_seconds": reload_seconds,
            "first_call_seconds": first_call_seconds,
            "dtype": str(getattr(reloaded, HEAD_NAME).weight.dtype).removeprefix("torch."),
            "size_mb_before": _weights_mb(model_dir), "size_mb_after": _weights_mb(stage),
        }
        write_json(metrics, stage / METRICS_FILE)
        del reloaded
    log.info("GPTQ %d-bit g%d: %s", bits, used_group, metrics)
    return metrics


def _verify(model, tok, texts: list[str], head_before: dict[str, torch.Tensor]) -> torch.Tensor:
    """Raise RuntimeError unless the block linears are quantised, the score head equals the
    unquantised one and the probe logits are finite; return the probe logits."""
    if not any(hasattr(m, "qweight") for m in model.modules()):
        raise RuntimeError("reloaded model has no GPTQ (qweight) layers")
    head_after = _head_weights(model)
    same = head_after.keys() == head_before.keys() and all(
        torch.equal(head_after[k], head_before[k].to(head_after[k].dtype)) for k in head_before)
    if not same:
        raise RuntimeError(f"the `{HEAD_NAME}` head changed in quantisation/reload")
    logits = _probe_logits(model, tok, texts)
    if not torch.isfinite(logits).all():
        raise RuntimeError("reloaded quantised model produces non-finite logits")
    return logits
