"""Padding-free training (trainer.packing): an optimizer step's rows packed end to end give the padded
step's loss and gradients, for every tiny architecture; a pack whose rows can see each other does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_worker import SPEC, make_task, settings

from lmsys.infer_packed import PackedForward, attention_implementation, classifier_parts, training_attention
from lmsys.models import build_model
from lmsys.token_model import first_fit, pack_lengths
from lmsys.train import (PackedBatches, PaddedBatches, TrainSet, cross_entropy_loss, epoch_groups, micro_batches,
                         step_gradients, train_classifier)
from test_train import assert_same_adapter


def trainable_model(kind, tok, window=None, softcap=None):
    """A tiny fp32 classifier with LoRA B moved off zero (so LoRA A gets gradients too); for Gemma-2 a
    sliding window and an attention soft-capping that bite on rows of up to 60 tokens."""
    torch.manual_seed(0)
    model = build_model({"kind": kind, "hidden": 64, "layers": 2, "heads": 4,
                         "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, tok)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    if window is not None:                 # config for the masks; each attention module caches its own copy
        cls = classifier_parts(model)[0]
        cls.config.sliding_window = window
        for m in cls.modules():
            if hasattr(m, "attn_logit_softcapping"):
                m.sliding_window = window if m.sliding_window is not None else None
                m.attn_logit_softcapping = softcap
    model.train()
    return model


def step_rows(tok, n=24, seed=5):
    ids, y = make_task(n, len(tok), seed=seed, min_len=2, max_len=60)        # ragged rows of 3..62 tokens
    w = np.linspace(0.5, 1.5, n).astype(np.float32)
    soft = np.random.default_rng(seed).normal(size=(n, 2, 3)).astype(np.float32)
    return TrainSet(ids, y, tok.pad_token_id, soft_targets=soft, sample_weight=w)


def soft_and_weighted_loss(logits, labels, soft, weight):
    """Cross-entropy on the labels plus a KL to the first soft target, sample-weighted: a loss that reads all three."""
    ce, _ = cross_entropy_loss(logits, labels, None, weight)
    kl = (torch.softmax(soft[:, 0], -1) * (torch.log_softmax(soft[:, 0], -1) - torch.log_softmax(logits, -1))).sum(-1)
    return ce + (kl * weight).mean(), {"kl": kl.mean()}


def one_step(model, rows, batches, group):
    """The loss and gradients [name -> tensor] of one optimizer step's micro-batches, as the trainer makes them."""
    model.zero_grad(set_to_none=True)
    micro = batches.split(group)
    with batches.step():
        loss, _ = step_gradients(model, micro, np.concatenate(group), rows, soft_and_weighted_loss, batches)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss, grads, micro


GROUP = [np.arange(0, 8), np.arange(8, 16), np.arange(16, 24)]       # one step: 3 micro-batches of 8 rows


def assert_same_step(a, b, tol=1e-5):
    (la, ga, _), (lb, gb, _) = a, b
    assert la == pytest.approx(lb, abs=tol)
    assert ga.keys() == gb.keys() and any("lora_A" in k for k in ga) and any("score" in k for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=tol, rtol=tol, msg=k)


CASES = {"llama": ("tiny-llama", {}), "qwen2": ("tiny-qwen2", {}),
         "gemma2": ("tiny-gemma2", {"window": 16, "softcap": 0.05})}


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("pack_tokens", [64, 200, 2048])             # many packs .. one
def test_a_packed_step_gives_the_padded_steps_loss_and_gradients(tok, arch, pack_tokens):
    kind, attn = CASES[arch]
    model = trainable_model(kind, tok, **attn)
    rows = step_rows(tok)
    padded = one_step(model, rows, PaddedBatches(model, rows, "cpu"), GROUP)
    packed = one_step(model, rows, PackedBatches(model, rows, "cpu", pack_tokens), GROUP)
    assert_same_step(padded, packed)
    micro = packed[2]
    assert sorted(np.concatenate(micro).tolist()) == list(range(24))           # every row of the step, once
    lengths = np.array([len(r) for r in rows.ids])
    assert all(lengths[p].sum() <= pack_tokens for p in micro)
    assert (len(micro) == 1) == (pack_tokens == 2048) and (len(micro) > 3) == (pack_tokens < 2048)
    if arch == "gemma2":                   # the window and the soft-capping bite: without either the loss moves
        assert lengths.max() > 16
        for window, softcap in ((4096, 0.05), (16, 1e4)):
            other = trainable_model(kind, tok, window=window, softcap=softcap)
            assert abs(one_step(other, rows, PaddedBatches(other, rows, "cpu"), GROUP)[0] - padded[0]) > 1e-4


class Broken:
    """The decoder called as PackedForward calls it, with one thing changed so the rows of a pack see each other."""

    def __init__(self, decoder, how):
        self.decoder, self.how = decoder, how

    def __call__(self, **kw):
        T = kw["input_ids"].shape[1]
        if self.how == "attention_mask":     # a 2-D mask of ones: transformers then builds a plain causal mask
            kw["attention_mask"] = torch.ones(1, T, dtype=torch.long)
        elif self.how == "positions":        # positions running on through the pack
            kw["position_ids"] = torch.arange(T)[None]
        else:                                # a cache: transformers skips its packed-sequence detection
            kw["use_cache"] = True
        return self.decoder(**kw)


@pytest.mark.parametrize("how", ["attention_mask", "positions", "use_cache"])
def test_a_pack_whose_rows_see_each_other_fails_the_comparison(tok, how):
    model = trainable_model("tiny-llama", tok)
    rows = step_rows(tok)
    padded = one_step(model, rows, PaddedBatches(model, rows, "cpu"), GROUP)
    batches = PackedBatches(model, rows, "cpu", 2048)
    batches.forward.decoder = Broken(batches.forward.decoder, how)
    with pytest.raises(AssertionError):
        assert_same_step(padded, one_step(model, rows, batches, GROUP))


def test_packs_follow_the_plans_rule_and_the_steps_rows():
    """The trainer's packs are token_model.first_fit of each epoch_groups group (what `lmsys plan` prices),
    so packing changes neither the rows of a step nor the number of steps."""
    lengths = np.random.default_rng(1).integers(1, 1025, size=200)
    ids = [[1] * int(n) for n in lengths]
    rows = TrainSet(ids, np.zeros(200, dtype=np.int64), 0)

    batches = PackedBatches.__new__(PackedBatches)            # the bookkeeping only: no model, no forward
    batches.lengths, batches.pack_tokens = lengths, 4096
    batches.forward = type("FlexBlocks", (), {"block": 128})()
    for group in epoch_groups(200, 0, seed=3, bs=4, accum=16):
        packs = batches.split(group)
        step = np.concatenate(group)
        assert sorted(np.concatenate(packs).tolist()) == sorted(step.tolist())
        assert sorted(batches.computed_tokens(p) for p in packs) == sorted(pack_lengths(lengths[step], 4096))
    assert first_fit([5, 9, 5, 2], 10) == [[1], [0, 2], [3]]
    with pytest.raises(ValueError, match="does not fit trainer.pack_tokens=10"):
        first_fit([11], 10)


def test_packed_training_resumes_exactly_and_stays_close_to_padded(tmp_path, tok):
    """A packed run killed after a checkpoint resumes to the uninterrupted packed run's adapter; and it
    trains the same steps as the padded run, to about the same adapter (only float rounding differs)."""
    ids, y = make_task(40, len(tok), seed=3, min_len=2, max_len=60)
    rows = TrainSet(ids, y, tok.pad_token_id)
    cfg = {"epochs": 2, "lr": 3e-3, "warmup_steps": 1, "batch_size": 4, "grad_accum": 2, "checkpoint_every": 3}
    packed = settings(**cfg, packing=True, pack_tokens=96)
    calls = {"n": 0}

    def crash_in_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5 * 3:            # ~3 packs a step: dies during step 5, after step 3's checkpoint
            raise RuntimeError("simulated crash")
        return cross_entropy_loss(*args)

    with pytest.raises(RuntimeError, match="simulated"):
        train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "r", settings=packed, loss_fn=crash_in_step_5)
    m = train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "r", settings=packed)
    assert m["resumed_from_step"] == 3 and m["steps"] == 10
    u = train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "u", settings=packed)
    assert_same_adapter(tmp_path / "r" / "final", tmp_path / "u" / "final", atol=0)
    p = train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "p", settings=settings(**cfg))
    assert p["steps"] == u["steps"] and p["train_loss_first"] == pytest.approx(u["train_loss_first"], abs=1e-5)
    assert_same_adapter(tmp_path / "p" / "final", tmp_path / "u" / "final", atol=1e-4)
    assert u["real_per_computed_token"] == 1.0 and p["real_per_computed_token"] < 0.9   # CPU packs: no padding at all


def test_packing_refuses_what_it_cannot_do(tok):
    model = trainable_model("tiny-llama", tok)
    rows = TrainSet([[1] * 50, [1] * 20], np.array([0, 1]), tok.pad_token_id)
    with pytest.raises(ValueError, match="does not fit trainer.pack_tokens=32"):
        PackedBatches(model, rows, "cpu", 32)
    with pytest.raises(ValueError, match="pad_to"):
        micro_batches(model, rows, settings(packing=True), "cpu", pad_to=64)
    with pytest.raises(TypeError, match="decoder classifier"):
        PackedBatches(torch.nn.Linear(2, 3), rows, "cpu", 64)


def test_cuda_packs_run_flex_attention_and_evaluations_the_models_own(tok):
    """On CUDA a training step switches an eager/sdpa model to flex attention (block masks instead of a
    dense T x T mask) and back after it; on a CPU nothing changes. (Checked without a GPU: the rule and
    the switch; flex attention's backward has no CPU kernel.)"""
    model = trainable_model("tiny-gemma2", tok)
    cls = classifier_parts(model)[0]
    assert cls.config._attn_implementation == "eager"
    assert training_attention(model, "cuda") == "flex_attention" and training_attention(model, "cpu") == "eager"
    with attention_implementation(model, "flex_attention"):
        assert cls.config._attn_implementation == "flex_attention"
        assert PackedForward(model, 0).block == 128
    assert cls.config._attn_implementation == "eager" and PackedForward(model, 0).block == 1


def test_one_flex_mask_buffer_serves_every_pack_length(tok):
    """The trainer's packs vary in length (each its rows rounded up to 128): one PackedFlexMasks (one set of
    mask functions: compiled flex attention sees no new closure per length) gives each length its own
    correct masks, and the flex forward of packs of 128 .. 512 tokens gives eager's logits (forward only:
    flex's backward has no CPU kernel)."""
    from lmsys.infer_packed import BLOCK, PackedFlexMasks
    masks = PackedFlexMasks(512, "cpu", sliding_window=100)
    functions = dict(masks.mask_mods)
    for lengths in ([300, 129, 1], [90, 20], [200, 180, 100]):
        T = -(-sum(lengths) // BLOCK) * BLOCK
        doc = np.repeat(np.arange(len(lengths) + 1), lengths + [T - sum(lengths)])
        m = masks.masks(torch.from_numpy(doc))
        for kind, window in (("full_attention", None), ("sliding_attention", 100)):
            q, kv = np.arange(T)[:, None], np.arange(T)[None, :]
            dense = (doc[:, None] == doc[None, :]) & (q >= kv) & ((q - kv < window) if window else True)
            got = m[kind].to_dense()[0, 0].numpy().astype(bool)     # blocks visited
            nb = T // BLOCK
            live = dense.reshape(nb, BLOCK, nb, BLOCK).any((1, 3))
            np.testing.assert_array_equal(got, live)
            np.testing.assert_array_equal(masks.mask_mods[kind](0, 0, torch.arange(T)[:, None], torch.arange(T)[None, :]).numpy(), dense)
    assert masks.mask_mods == functions
    with pytest.raises(ValueError, match="multiples of 128 up to 512"):
        masks.masks(torch.zeros(640, dtype=torch.long))

    model = trainable_model("tiny-gemma2", tok, window=16, softcap=0.05)
    rows = step_rows(tok)
    eager = PackedBatches(model, rows, "cpu", 200)
    packs = eager.split(GROUP)
    with torch.inference_mode():
        want = [eager.logits(p) for p in packs]
        with attention_implementation(model, "flex_attention"):
            flex = PackedBatches(model, rows, "cpu", 200)
            assert flex.forward.block == 128 and {flex.computed_tokens(p) for p in packs} == {128, 256}
            got = [flex.logits(p) for p in packs]
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
