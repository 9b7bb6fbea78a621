"""Packed inference: rows packed end to end (block-diagonal attention) give predict_logits' logits,
in input order, for every attention path it supports."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_worker import make_task

from lmsys.infer import predict_logits
from lmsys.infer_packed import (
    BLOCK,
    PackedFlexMasks,
    build_pack,
    classifier_parts,
    pack_stats,
    plan_packs,
    pooled_index,
    predict_logits_packed,
)
from lmsys.models import build_model


def tiny_model(kind, tok, attn="eager", **extra):
    spec = {"kind": kind, "hidden": 64, "layers": 2, "heads": 4, "attn_implementation": attn,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **extra}
    model = build_model(spec, tok, trainable=False)
    with torch.no_grad():  # a non-zero LoRA, so the adapter path is exercised too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def gemma2_attention(model, window: int, softcap: float | None = None):
    """Change Gemma-2's sliding window (config: masks) and soft-capping (cached by each attention
    module at build time) after the model is built."""
    cls, _, _ = classifier_parts(model)
    cls.config.sliding_window = window
    for m in cls.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.sliding_window = window if m.sliding_window is not None else None
            if softcap is not None:
                m.attn_logit_softcapping = softcap


def rows(tok, n=37, max_len=40, seed=5):
    ids, _ = make_task(n, len(tok), seed=seed, min_len=2, max_len=max_len)  # ragged lengths, odd count
    return ids


# ---------------------------------------------------------------- planning (no model)

def test_plan_packs_holds_every_row_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2001, size=500)
    packs, T = plan_packs(lengths, max_tokens=16384)
    assert T % BLOCK == 0 and T <= 16384
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == list(range(500))
    assert all(lengths[p].sum() <= T for p in packs)
    assert len(packs) == -(-int(lengths.sum()) // 16384) or len(packs) == -(-int(lengths.sum()) // 16384) + 1
    st = pack_stats(lengths, 16384)
    assert st["padding_share"] < 0.05 and st["real_tokens"] == int(lengths.sum())


def test_plan_packs_edge_cases():
    assert plan_packs([], 100) == ([], 0)
    with pytest.raises(ValueError, match="longer than max_tokens"):
        plan_packs([5, 300], max_tokens=256)
    with pytest.raises(ValueError, match="empty"):
        plan_packs([3, 0], max_tokens=256)
    packs, T = plan_packs([300], max_tokens=300)  # one row exactly at the limit: T rounds up
    assert T == 384 and [p.tolist() for p in packs] == [[0]]
    packs, T = plan_packs([5, 7, 3], max_tokens=1000, fixed_length=True)  # one shape whatever the data
    assert T == 1024 and [sorted(p.tolist()) for p in packs] == [[0, 1, 2]]
    packs, T = plan_packs([100] * 30, max_tokens=1000, fixed_length=True)
    assert T == 1024 and len(packs) == 3 and all(len(p) == 10 for p in packs)


def test_build_pack_positions_docs_and_pooling():
    ids = [[1, 5, 6], [1, 7], [1, 8, 0, 0]]  # the last row ends in pad tokens (id 0)
    p = build_pack(ids, np.array([2, 0, 1]), T=12, pad_id=0, pool_pad_id=0)
    assert p.input_ids.tolist() == [1, 8, 0, 0, 1, 5, 6, 1, 7, 0, 0, 0]
    assert p.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]
    assert p.doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert p.last.tolist() == [1, 6, 8]  # the model's own rule: the last non-pad token
    assert pooled_index([0, 0], 0) == 0 and pooled_index([4, 0], None) == 1


@pytest.mark.parametrize("window", [None, 200, 1000])
def test_flex_block_mask_matches_the_dense_rule(window):
    """The block lists built from row boundaries agree with the mask function on every block."""
    T, lengths = 1024, [300, 129, 1, 250, 127]
    doc = np.repeat(np.arange(len(lengths) + 1), lengths + [T - sum(lengths)])
    fm = PackedFlexMasks(T, "cpu", sliding_window=window)
    m = fm.masks(torch.from_numpy(doc))["sliding_attention" if window else "full_attention"]
    q = np.arange(T)[:, None]
    kv = np.arange(T)[None, :]
    dense = (doc[:, None] == doc[None, :]) & (q >= kv)
    if window:
        dense &= q - kv < window
    nb = T // BLOCK
    blocks = dense.reshape(nb, BLOCK, nb, BLOCK).transpose(0, 2, 1, 3)
    any_, all_ = blocks.any((2, 3)), blocks.all((2, 3))
    partial = np.zeros((nb, nb), bool)
    full = np.zeros((nb, nb), bool)
    kn, ki = m.kv_num_blocks[0, 0].numpy(), m.kv_indices[0, 0].numpy()
    fn, fi = m.full_kv_num_blocks[0, 0].numpy(), m.full_kv_indices[0, 0].numpy()
    for i in range(nb):
        partial[i, ki[i, :kn[i]]] = True
        full[i, fi[i, :fn[i]]] = True
    assert not (partial & full).any()
    np.testing.assert_array_equal(partial | full, any_)   # every block with a live pair is visited
    assert not (full & ~all_).any()                        # "full" blocks really are all live
    # the mask function itself gives the dense rule
    mm = fm.mask_mods["sliding_attention" if window else "full_attention"]
    got = mm(0, 0, torch.arange(T)[:, None], torch.arange(T)[None, :]).numpy()
    np.testing.assert_array_equal(got, dense)


# ---------------------------------------------------------------- against predict_logits

@pytest.mark.parametrize("kind,attn", [("tiny-gemma2", "eager"), ("tiny-llama", "eager"), ("tiny-llama", "sdpa")])
def test_packed_matches_predict_logits_in_input_order(kind, attn, tok):
    torch.manual_seed(0)
    model = tiny_model(kind, tok, attn)
    ids = rows(tok)
    ref = predict_logits(model, ids, tok.pad_token_id, batch_size=8)
    for max_tokens, fixed in ((64, False), (256, False), (4096, False), (300, True)):  # many packs .. one
        got = predict_logits_packed(model, ids, tok.pad_token_id, max_tokens=max_tokens, fixed_length=fixed)
        assert got.shape == (37, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.abs(ref - ref[0]).max() > 1e-3  # rows really differ, so the order check means something


def test_packed_gemma2_sliding_window_across_rows(tok):
    """A window shorter than the pack and than some rows: the sliding layers must still see only
    their own row, and only the last `window` tokens of it."""
    torch.manual_seed(1)
    model = tiny_model("tiny-gemma2", tok, "eager")
    gemma2_attention(model, 16)
    ids = rows(tok, n=21, max_len=60, seed=7)
    ref = predict_logits(model, ids, tok.pad_token_id, batch_size=4)
    got = predict_logits_packed(model, ids, tok.pad_token_id, max_tokens=512)
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-gemma2", "tiny-llama"])
def test_packed_flex_attention_matches_eager(kind, tok):
    """The GPU path's masks (BlockMask from row boundaries, soft-capping in the flex kernel), on CPU."""
    torch.manual_seed(2)
    model = tiny_model(kind, tok, "eager")
    if kind == "tiny-gemma2":  # a window that bites inside the longer rows; strong soft-capping
        gemma2_attention(model, 24, softcap=0.1)
    ids = rows(tok, n=29, max_len=60, seed=3)
    ref = predict_logits(model, ids, tok.pad_token_id, batch_size=8)
    model.set_attn_implementation("flex_attention")
    got = predict_logits_packed(model, ids, tok.pad_token_id, max_tokens=512)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_packed_rejects_what_it_cannot_do(tok):
    model = tiny_model("tiny-llama", tok)
    with pytest.raises(ValueError, match="longer than max_tokens"):
        predict_logits_packed(model, [[1] * 300], tok.pad_token_id, max_tokens=256)
    assert predict_logits_packed(model, [], tok.pad_token_id).shape == (0, 3)

    class Bert(torch.nn.Module):
        base_model_prefix = "bert"
        bert = torch.nn.Linear(2, 2)
        classifier = torch.nn.Linear(2, 3)
    with pytest.raises(TypeError, match="decoder classifier"):
        predict_logits_packed(Bert(), [[1, 2]], 0)
