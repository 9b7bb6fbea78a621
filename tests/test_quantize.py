"""GPTQ step 7 on tiny random classifiers (CPU, gptqmodel backend through transformers)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from pinned import pinned_import

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # read when gptqmodel builds its pool; 2-core CI
pinned_import("gptqmodel", "GPTQModel", module_level=True)
pinned_import("optimum", "optimum", module_level=True)

from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: E402

from lmsys.quantize import METRICS_FILE, load_quantized, quantize_gptq, resolve_group_size  # noqa: E402
from train_worker import corpus  # noqa: E402

METRIC_KEYS = {"bits", "group_size", "n_calibration", "log_loss_unquantized", "log_loss_quantized",
               "log_loss_change", "quantize_seconds", "reload_seconds", "size_mb_before", "size_mb_after"}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, head_dim=16, num_labels=3)


def _save_tiny(kind: str, d, tok) -> None:
    """A seeded random-init 3-label classifier with its tokenizer, saved like the ensemble step does."""
    extra = {"query_pre_attn_scalar": 16, "sliding_window": 4096} if kind == "gemma2" else {}
    cfg = AutoConfig.for_model(kind, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TINY, **extra)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("llama")
    _save_tiny("llama", d, tok)
    return d


def _logits(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


def _eval_fn(texts):
    """Cross-entropy against fixed labels: a stand-in for the step's log loss on competition rows."""
    labels = torch.arange(len(texts)) % 3
    return lambda model, tok: float(torch.nn.functional.cross_entropy(_logits(model, tok, texts), labels))


def _assert_quantized_copy(src, out, tok, max_diff: float):
    ref = AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    q = load_quantized(out, "cpu")
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    qlayers = [n for n, m in q.named_modules() if isinstance(m, BaseQuantLinear)]
    assert len(qlayers) == 7 * 2 and all(hasattr(q.get_submodule(n), "qweight") for n in qlayers)
    assert isinstance(q.score, torch.nn.Linear) and torch.equal(q.score.weight, ref.score.weight)
    texts = corpus(6, seed=7)
    a, b = _logits(ref, tok, texts), _logits(q, tok, texts)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() < max_diff


def test_llama_8bit_roundtrip(tmp_path, llama_dir, tok):
    texts = corpus(16, seed=1)
    out = tmp_path / "q"
    m = quantize_gptq(llama_dir, out, texts, bits=8, group_size=32, model_seqlen=64, eval_fn=_eval_fn(texts[:8]))
    assert METRIC_KEYS <= m.keys()
    assert (m["bits"], m["group_size"], m["group_size_fallback"], m["n_calibration"]) == (8, 32, False, 16)
    assert abs(m["log_loss_change"]) < 0.01 and m["max_abs_logit_diff"] < 0.01
    assert json.loads((out / METRICS_FILE).read_text()) == pytest.approx(m)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 8 and not cfg.get("dataset")  # calib rows not kept
    assert (out / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind
    _assert_quantized_copy(llama_dir, out, tok, max_diff=0.01)


def test_group_size_fallback_and_4bit(tmp_path, llama_dir, tok):
    out = tmp_path / "q"
    m = quantize_gptq(llama_dir, out, corpus(16, seed=1), bits=4, group_size=128, model_seqlen=64)
    assert (m["group_size"], m["group_size_requested"], m["group_size_fallback"]) == (64, 128, True)
    assert m["log_loss_quantized"] is None and (out / METRICS_FILE).exists()
    _assert_quantized_copy(llama_dir, out, tok, max_diff=0.2)


def test_gemma2_8bit(tmp_path, tok):
    src = tmp_path / "gemma2"
    _save_tiny("gemma2", src, tok)
    m = quantize_gptq(src, tmp_path / "q", corpus(16, seed=1), bits=8, group_size=32, model_seqlen=64)
    assert m["max_abs_logit_diff"] < 0.05
    _assert_quantized_copy(src, tmp_path / "q", tok, max_diff=0.05)


def test_backend_recorded_and_used_on_reload(tmp_path, llama_dir, tok):
    """quantize.backend picks gptqmodel's kernel (the gpu-smoke profile: Triton, because `auto`'s Marlin
    compiles a CUDA extension for minutes); quantize.json records it and a later load uses it."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    out = tmp_path / "q"
    m = quantize_gptq(llama_dir, out, corpus(16, seed=1), bits=8, group_size=32, model_seqlen=64, backend="gptq_torch")
    assert m["backend"] == json.loads((out / METRICS_FILE).read_text())["backend"] == "gptq_torch"

    def kernels(model):
        return {type(mod).__name__ for mod in model.modules() if isinstance(mod, BaseQuantLinear)}
    assert kernels(load_quantized(out, "cpu")) == {"TorchLinear"}          # the recorded one
    other = kernels(load_quantized(out, "cpu", backend="gptq_torch_int8"))     # an explicit one wins
    assert len(other) == 1 and other != {"TorchLinear"}, other


def test_resolve_group_size():
    cfg = AutoConfig.for_model("llama", **TINY)
    assert resolve_group_size(cfg, 32) == 32 and resolve_group_size(cfg, -1) == -1
    assert resolve_group_size(cfg, 128) == 64 and resolve_group_size(cfg, 96) == 64
    assert resolve_group_size(AutoConfig.for_model("llama", **{**TINY, "intermediate_size": 96}), 64) == 32


def test_errors(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="bits"):
        quantize_gptq(llama_dir, tmp_path / "q", ["x"], bits=5)
    with pytest.raises(ValueError, match="group_size"):
        quantize_gptq(llama_dir, tmp_path / "q", ["x"], group_size=0)
    with pytest.raises(ValueError, match="calibration"):
        quantize_gptq(llama_dir, tmp_path / "q", [])
    with pytest.raises(ValueError, match="not a GPTQ"):
        load_quantized(llama_dir, "cpu")
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing")
    assert not (tmp_path / "q").exists()


def test_missing_backend_hint(monkeypatch, tmp_path, llama_dir):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gptqmodel" else real(n, *a))
    with pytest.raises(ImportError, match="pip install gptqmodel"):
        quantize_gptq(llama_dir, tmp_path / "q", ["x"])
