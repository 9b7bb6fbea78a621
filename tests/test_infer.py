"""Batched inference: length-sorted, per-batch padding gives the naive path's logits, in input order."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lmsys.infer import pad_batch, predict_logits
from lmsys.models import TINY_KINDS, build_model
from train_worker import make_task


def tiny_model(kind, tok):
    spec = {"kind": kind, "hidden": 64, "layers": 2, "heads": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    model = build_model(spec, tok, trainable=False)
    with torch.no_grad():  # a non-zero LoRA so the adapter path is exercised too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_pad_batch_right_pads_with_mask():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5]], pad_id=2, pad_to=3)
    assert ids.tolist() == [[5, 2, 2]] and mask.tolist() == [[1, 0, 0]]
    with pytest.raises(ValueError, match="longer than pad_to"):
        pad_batch([[1, 2, 3]], 0, pad_to=2)
    with pytest.raises(ValueError, match="empty"):
        pad_batch([[1], []], 0)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_sorted_batches_match_fixed_padding_in_input_order(kind, tok):
    torch.manual_seed(0)
    model = tiny_model(kind, tok)
    ids, _ = make_task(37, len(tok), seed=5, min_len=2, max_len=40)  # ragged lengths, odd count
    fast = predict_logits(model, ids, tok.pad_token_id, batch_size=8)
    naive = predict_logits(model, ids, tok.pad_token_id, batch_size=8, sort_by_length=False, pad_to=64)
    assert fast.shape == (37, 3) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    # input order: row i's logits are row i's alone (batch of one, no padding at all)
    for i in (0, 17, 36):
        one = predict_logits(model, [ids[i]], tok.pad_token_id, batch_size=1)
        np.testing.assert_allclose(fast[i], one[0], atol=1e-4)
    assert np.abs(fast - fast[0]).max() > 1e-3  # rows really differ, so the order check means something


def test_progress_lines_and_edge_cases(tok, caplog):
    model = tiny_model("tiny-llama", tok)
    ids, _ = make_task(10, len(tok), seed=6)
    with caplog.at_level(logging.INFO, logger="lmsys.infer"):
        out = predict_logits(model, ids, tok.pad_token_id, batch_size=3, progress_every=2, desc="probe")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe")]
    assert len(lines) == 2 and "batch 4/4" in lines[-1]  # after batches 2 and 4 (the last)
    assert out.shape == (10, 3) and np.isfinite(out).all()
    assert predict_logits(model, [], tok.pad_token_id, batch_size=4).shape == (0, 3)
    with pytest.raises(ValueError):
        predict_logits(model, ids, tok.pad_token_id, batch_size=0)
