"""Padding-free training on CUDA (issue 19 item 1): the step runs flex attention with block masks (an
eager/sdpa model switched for the step, back after it) and gives the padded step's loss and gradients.
The CPU tests (tests/test_train_packed.py) cover transformers' dense packed mask; flex attention's
backward has no CPU kernel, so this path is checked only here. Skipped without CUDA (tests/gpu/conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmsys.infer_packed import classifier_parts
from lmsys.models import build_model
from lmsys.train import PackedBatches, PaddedBatches, TrainSet, cross_entropy_loss, step_gradients
from train_worker import make_task

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-gemma2"])
def test_a_packed_flex_step_gives_the_padded_steps_loss_and_gradients_on_cuda(tok, kind):
    torch.manual_seed(0)
    model = build_model({"kind": kind, "hidden": 64, "layers": 2, "heads": 4,
                         "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, tok, device="cuda")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    ids, y = make_task(24, len(tok), seed=5, min_len=2, max_len=300)
    rows = TrainSet(ids, y, tok.pad_token_id)
    group = [np.arange(0, 8), np.arange(8, 16), np.arange(16, 24)]
    before = classifier_parts(model)[0].config._attn_implementation

    def step(batches):
        model.zero_grad(set_to_none=True)
        micro = batches.split(group)
        with batches.step():
            inside = classifier_parts(model)[0].config._attn_implementation
            loss, _ = step_gradients(model, micro, np.concatenate(group), rows, cross_entropy_loss, batches)
        return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}, inside

    padded = step(PaddedBatches(model, rows, torch.device("cuda")))
    packed = step(PackedBatches(model, rows, torch.device("cuda"), 1024))
    assert packed[2] == "flex_attention" and padded[2] == before != "flex_attention"
    assert classifier_parts(model)[0].config._attn_implementation == before
    assert packed[0] == pytest.approx(padded[0], abs=1e-4)
    for k in padded[1]:
        torch.testing.assert_close(packed[1][k], padded[1][k], atol=1e-4, rtol=1e-3, msg=k)
