"""Which inference path the steps take (issue 19 item 4): packed on a CUDA card whose compute capability
is verified (`infer.verified_capabilities`), padded on the CPU, on every other card and when asked
(`infer.packed: false`); both give the same logits up to rounding. No GPU here: the capability is
patched (lmsys.devices.capability), so the packed path's flex-attention kernels run on the CPU.

The step tests run the real tiny steps (one teacher, one fold, a small demo) in a tmp root once, then
rerun filter-score, teacher-logits, the out-of-fold pass and predict under a patched capability."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys import devices, infer, infer_packed
from lmsys.config import load_config
from lmsys.data.schema import LOGIT_COLUMNS
from lmsys.infer import PADDED, Route, classify, predict_logits, predict_logits_resumable, route
from lmsys.paths import Layout
from test_infer_packed import rows, tiny_model

AUTO = {"packed": "auto", "pack_tokens": 512, "verified_capabilities": ["9.0"]}

H200, T4, A100 = (9, 0), (7, 5), (8, 0)


@pytest.fixture
def card(monkeypatch):
    """card(cap): every device reports compute capability `cap` (None: no CUDA device), and every call
    of the packed path is counted in the returned list."""
    calls: list[int] = []
    real = infer_packed.predict_logits_packed

    def counted(model, ids, *a, **k):
        calls.append(len(ids))
        return real(model, ids, *a, **k)
    monkeypatch.setattr(infer_packed, "predict_logits_packed", counted)

    def set_card(cap):
        monkeypatch.setattr(devices, "capability", lambda device: cap)
        calls.clear()
        return calls
    return set_card


# ---------------------------------------------------------------- the route

def test_route_packed_only_on_a_verified_capability(tok, card):
    model = tiny_model("tiny-llama", tok)
    card(None)
    assert route(model, AUTO) == Route(False, 0, "infer.packed auto: cpu, not a CUDA GPU")
    card(T4)
    assert not route(model, AUTO).packed and "7.5 is not in infer.verified_capabilities ['9.0']" in route(model, AUTO).reason
    card(A100)
    assert not route(model, AUTO).packed                       # not verified: never sent down that path
    card(H200)
    assert route(model, AUTO) == Route(True, 512, "infer.packed auto: compute capability 9.0 verified")
    assert route(model, {**AUTO, "packed": False}) == Route(False, 0, "infer.packed false")   # the fallback switch
    card(None)
    assert route(model, {**AUTO, "packed": True}).packed                                       # asked for on the CPU


def test_route_keeps_models_without_a_decoder_padded(card):
    class Bert(torch.nn.Module):
        base_model_prefix = "bert"

        def __init__(self):
            super().__init__()
            self.bert, self.classifier = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    card(H200)
    assert not route(Bert(), AUTO).packed and "not a decoder classifier" in route(Bert(), AUTO).reason
    with pytest.raises(TypeError, match="infer.packed true: the packed path needs a decoder"):
        route(Bert(), {**AUTO, "packed": True})


@pytest.mark.parametrize("kind", ["tiny-gemma2", "tiny-llama"])
def test_classify_packed_equals_padded_and_restores_attention(kind, tok, card):
    """The packed route (flex attention, fixed-length packs) against the padded one, in input order;
    the model's own attention implementation is back afterwards."""
    torch.manual_seed(3)
    model = tiny_model(kind, tok)
    ids = rows(tok, n=29, max_len=60, seed=4)
    calls = card(H200)
    ref = classify(model, ids, tok.pad_token_id, 8, PADDED)
    assert calls == []
    got = classify(model, ids, tok.pad_token_id, 8, route(model, {**AUTO, "pack_tokens": 256}))
    assert calls == [29] and got.shape == (29, 3)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.abs(ref - ref[0]).max() > 1e-3
    assert model.get_base_model().config._attn_implementation == "eager"


def test_resumable_shards_on_the_packed_path(tmp_path, tok, card):
    """Packed shards: each shard packed on its own, equal to the padded path up to rounding; a rerun
    after losing a shard recomputes only it, bit for bit; shards of the other path are discarded."""
    torch.manual_seed(5)
    model = tiny_model("tiny-llama", tok)
    ids = rows(tok, n=45, max_len=50, seed=6)
    card(H200)
    packed = route(model, AUTO)
    work = tmp_path / "shards"
    padded, _ = predict_logits_resumable(model, ids, tok.pad_token_id, 8, work, shard_rows=16)
    np.testing.assert_array_equal(padded, predict_logits(model, ids, tok.pad_token_id, 8))
    first, info = predict_logits_resumable(model, ids, tok.pad_token_id, 8, work, shard_rows=16, path=packed)
    assert info == {"shards": 3, "shards_resumed": 0, "rows": 45}          # the padded shards were not reused
    np.testing.assert_allclose(first, padded, atol=1e-4)
    (work / "shard-00001.npy").unlink()
    again, info = predict_logits_resumable(model, ids, tok.pad_token_id, 8, work, shard_rows=16, path=packed)
    assert info["shards_resumed"] == 2
    np.testing.assert_array_equal(again, first)


# ---------------------------------------------------------------- the steps

SMALL = {"folds.n_folds": 2, "folds.use": [0], "models.teachers": ["llama"], "demo.rows": 160, "demo.test_rows": 30,
         "demo.external_rows": 30, "demo.ut_rows": 50, "train_teacher.epochs": 1, "distill.epochs": 1,
         "distill.max_steps": 4, "text.train_max_length": 128, "text.infer_max_length": 128, "text.prompt_tokens": 32,
         "orchestration.shard_rows": 64, "infer.pack_tokens": 512}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The tiny recipe up to predict (one teacher, fold 0) on the CPU: every inference on the padded path."""
    from lmsys.steps.recipe import run_step, tasks_of
    root = tmp_path_factory.mktemp("route-root")
    cfg = load_config("tiny", SMALL)
    cfg["root"] = str(root)
    layout = Layout("tiny", root)
    metrics = {}
    for name, keys in tasks_of(cfg):
        if name != "evaluate":
            metrics[name] = run_step(name, cfg, layout, **keys).metrics
    return cfg, layout, metrics, _outputs(layout)


def _outputs(layout: Layout) -> dict[str, np.ndarray]:
    return {"filter-score": pd.read_parquet(layout.filter_scores("llama"))[["p_a", "p_b", "p_tie"]].to_numpy(),
            "teacher-logits": pd.read_parquet(layout.logits("llama", 0))[LOGIT_COLUMNS].to_numpy(),
            "predict": pd.read_parquet(layout.predictions / "test_probs.parquet")[["p_a", "p_b", "p_tie"]].to_numpy()}


@pytest.mark.parametrize("cap, packed", [(H200, True), (T4, False)])
def test_steps_route_by_capability_with_the_same_results(small_run, card, cap, packed):
    """filter-score, teacher-logits and predict rerun as on a card of capability `cap`: an H200 (9.0,
    verified) takes the packed path (the packed code really runs: its calls are counted, with more
    than one shard), a T4 (7.5) the padded one, bit for bit as on the CPU; the results agree up to
    rounding either way, and each step's metrics say which path it took and why."""
    from lmsys.steps.recipe import run_step
    cfg, layout, cpu_metrics, before = small_run                   # before: the outputs of the CPU run
    assert cpu_metrics["predict"]["inference"] == "padded (infer.packed auto: cpu, not a CUDA GPU)"
    calls = card(cap)
    got = {}
    for name, keys in (("filter-score", {"model": "llama"}), ("teacher-logits", {"model": "llama", "fold": 0}),
                       ("predict", {})):
        got[name] = run_step(name, cfg, layout, **keys).metrics["inference"]
    after = _outputs(layout)
    want = ("packed (infer.packed auto: compute capability 9.0 verified)" if packed else
            "padded (infer.packed auto: compute capability 7.5 is not in infer.verified_capabilities ['9.0'])")
    assert got == {name: want for name in got}
    if packed:
        n_logits = len(after["teacher-logits"])
        assert n_logits > 64 and len(calls) >= 2 + -(-n_logits // 64) and sum(calls) > n_logits   # shards, both TTA orders
        for name in before:
            np.testing.assert_allclose(after[name], before[name], atol=1e-4, err_msg=name)
    else:
        assert calls == []
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_out_of_fold_pass_routes_by_capability(small_run, card, tmp_path):
    """The distill step's out-of-fold pass (both orders) on the packed path on a verified card, equal to
    the padded pass up to rounding."""
    from lmsys.config import for_step
    from lmsys.steps import common, student
    from lmsys.steps.recipe import STEPS
    cfg, layout, _, _ = small_run
    step_cfg = for_step(cfg, STEPS["distill"].params)              # what the step may read
    _, val = common.fold_tables(layout, 0)
    tok, net = common.build(cfg, layout, "gemma", init_adapter=common.adapter(layout.student(0)), trainable=False)
    out = {}
    for cap in (None, H200):
        calls = card(cap)
        student._write_oof(step_cfg, net, tok, val, tmp_path / f"{cap}.parquet")
        out[cap] = pd.read_parquet(tmp_path / f"{cap}.parquet")
        assert len(calls) == (2 if cap else 0)
    cols = [*LOGIT_COLUMNS, *(f"swapped_{c}" for c in LOGIT_COLUMNS)]
    np.testing.assert_allclose(out[H200][cols].to_numpy(), out[None][cols].to_numpy(), atol=1e-4)
    written = pd.read_parquet(layout.student(0) / "oof.parquet")
    np.testing.assert_array_equal(out[None][cols].to_numpy(), written[cols].to_numpy())   # what distill wrote
    assert json.loads((layout.student(0) / "metrics.json").read_text())["steps"] == 4
