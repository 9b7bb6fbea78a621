"""The classification trainer: it learns, keeps the best adapter, and resumes exactly after a kill."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmsys.infer import predict_logits
from lmsys.models import build_model, load_for_inference
from lmsys.train import TrainSet, ValSet, cross_entropy_loss, train_classifier, val_metrics
from train_worker import SPEC, make_task, settings

TESTS = Path(__file__).resolve().parent


def adapter(d: Path) -> dict:
    return load_file(str(d / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


def test_learns_marker_task_and_keeps_best(tmp_path, tok):
    ids, y = make_task(320, len(tok), seed=0)
    vids, vy = make_task(96, len(tok), seed=1)
    cfg = {"epochs": 1, "lr": 3e-3, "warmup_steps": 2, "batch_size": 16, "grad_accum": 1,
           "eval_every": 10, "checkpoint_every": 5}
    m = train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id), out_dir=tmp_path, settings=settings(**cfg),
                         val=ValSet(vids, vy))

    prior = np.bincount(y, minlength=3) / len(y)
    prior_ll = float(-np.log(prior[vy]).mean())  # log loss of always predicting the class prior
    assert m["steps"] == 20 and [e["step"] for e in m["evals"]] == [10, 20]
    assert m["best_val_log_loss"] < min(math.log(3), prior_ll) - 0.2, m["evals"]
    assert m["best_val_log_loss"] == min(e["log_loss"] for e in m["evals"])
    assert m["samples_per_s"] > 0 and m["train_loss_last"] < m["train_loss_first"]
    assert json.loads((tmp_path / "metrics.json").read_text())["best_val_log_loss"] == m["best_val_log_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final", "metrics.json"]  # checkpoint gone
    assert_same_adapter(tmp_path / "best", tmp_path / "final", atol=0)
    # the saved adapter reloads onto a fresh base and reproduces the recorded val log loss
    model = load_for_inference(tmp_path / "final", SPEC, tok)
    got = val_metrics(predict_logits(model, vids, tok.pad_token_id, 32), vy)
    assert got["log_loss"] == pytest.approx(m["best_val_log_loss"], abs=1e-4)


def test_custom_loss_gets_soft_targets_and_weights(tmp_path, tok):
    ids, y = make_task(24, len(tok), seed=2)
    soft = np.random.default_rng(0).normal(size=(24, 2, 3)).astype(np.float32)  # [N, teachers, 3]
    weight = np.linspace(0.5, 1.5, 24)
    seen = []

    def loss_fn(logits, labels, soft_b, weight_b):
        seen.append((logits.shape, labels.shape, soft_b.shape, weight_b.shape))
        loss, parts = cross_entropy_loss(logits, labels, None, weight_b)
        return loss, {**parts, "kl": torch.tensor(0.5)}

    cfg = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "grad_accum": 2}  # 3 batches -> steps of 2 + 1
    m = train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id, soft, weight), out_dir=tmp_path,
                         settings=settings(**cfg), loss_fn=loss_fn)
    assert m["steps"] == 2 and len(seen) == 3
    assert all(s[1:] == (torch.Size([8]), torch.Size([8, 2, 3]), torch.Size([8])) for s in seen)
    assert m["train_loss_parts_last"]["kl"] == pytest.approx(0.5)
    assert m["best_val_log_loss"] is None and (tmp_path / "final" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="soft_targets"):
        TrainSet(ids, y, 0, soft_targets=soft[:3])


def test_grad_accumulation_equals_one_big_batch(tmp_path, tok):
    ids, y = make_task(44, len(tok), seed=4)  # steps of 24 + 20 rows; micro-batches 8, 8, 8 | 8, 8, 4
    base = {"epochs": 1, "lr": 1e-2, "warmup_steps": 0}
    rows = TrainSet(ids, y, tok.pad_token_id)
    train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "big", settings=settings(**base, batch_size=24), seed=1)
    train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "acc", settings=settings(**base, batch_size=8, grad_accum=3),
                     seed=1)
    assert_same_adapter(tmp_path / "big" / "final", tmp_path / "acc" / "final")


def test_resume_after_crash_in_process_with_dropout(tmp_path, tok):
    """A crash mid-run leaves a checkpoint; the rerun continues it exactly (RNG included: dropout on)."""
    spec = {**SPEC, "lora": {**SPEC["lora"], "dropout": 0.2}}
    ids, y = make_task(40, len(tok), seed=3)
    cfg = {"epochs": 2, "lr": 3e-3, "warmup_steps": 1, "batch_size": 8, "checkpoint_every": 3}  # 5 steps/epoch
    rows = TrainSet(ids, y, tok.pad_token_id)
    calls = {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == 8:  # dies during step 8, after the checkpoint of step 6 (mid epoch 2)
            raise RuntimeError("simulated crash")
        return cross_entropy_loss(*args)

    with pytest.raises(RuntimeError, match="simulated"):
        train_classifier(build_model(spec, tok), rows, out_dir=tmp_path / "r", settings=settings(**cfg), loss_fn=crashing)
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["global_step"] == 6
    m = train_classifier(build_model(spec, tok), rows, out_dir=tmp_path / "r", settings=settings(**cfg))
    assert m["resumed_from_step"] == 6 and m["steps"] == 10 and not (tmp_path / "r" / "checkpoint").exists()
    train_classifier(build_model(spec, tok), rows, out_dir=tmp_path / "u", settings=settings(**cfg))
    assert_same_adapter(tmp_path / "r" / "final", tmp_path / "u" / "final")


def test_dynamic_weights_are_used_observed_and_resumed_exactly(tmp_path, tok):
    """EMA information-gain weights (lmsys.distill) change as the student trains; a crash and resume
    restores their state from the checkpoint, so the result equals an uninterrupted run's."""
    from lmsys.distill import EmaInfoGainWeights
    ids, y = make_task(40, len(tok), seed=5)
    teacher = np.eye(3)[y] * 4.0                                                   # [N, 3], right on every row
    make = lambda: EmaInfoGainWeights(teacher, y, prior=np.bincount(y, minlength=3), decay=0.5)  # noqa: E731
    cfg = {"epochs": 2, "lr": 3e-3, "warmup_steps": 1, "batch_size": 8, "checkpoint_every": 3}   # 5 steps/epoch
    seen, calls = [], {"n": 0}

    def loss(logits, labels, soft, weight, crash_at=None):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        seen.append(weight.clone())
        return cross_entropy_loss(logits, labels, None, weight)

    w = make()
    train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id, sample_weight=w), out_dir=tmp_path / "u",
                     settings=settings(**cfg), loss_fn=loss)
    assert len(seen) == 10 and all(s.shape == (8,) for s in seen)
    assert not torch.allclose(seen[0], seen[-1])                                   # the weights moved
    assert np.isclose(w.batch(np.arange(40)).mean(), 1.0) and not np.allclose(w.ema.probs[0], w.ema.probs[-1])
    crash_at = calls["n"] + 8                                                      # dies in step 8, after step 6's checkpoint
    with pytest.raises(RuntimeError, match="simulated"):
        train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id, sample_weight=make()), out_dir=tmp_path / "r",
                         settings=settings(**cfg), loss_fn=lambda *a: loss(*a, crash_at=crash_at))
    r = make()
    m = train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id, sample_weight=r), out_dir=tmp_path / "r",
                         settings=settings(**cfg))
    assert m["resumed_from_step"] == 6
    assert np.array_equal(r.ema.probs, w.ema.probs)                                # EMA restored, then the same updates
    assert_same_adapter(tmp_path / "r" / "final", tmp_path / "u" / "final")


def test_checkpoint_of_another_loss_or_weighting_is_not_resumed(tmp_path, tok):
    """Settings outside the optimizer (a loss setting of the section, the sample weights) are part of a
    run's identity: a checkpoint left by a run with other ones is discarded, not continued."""
    from lmsys.config import load_config
    from lmsys.settings import Distill
    ids, y = make_task(40, len(tok), seed=6)
    rows = TrainSet(ids, y, tok.pad_token_id)
    section = {**load_config("tiny")["distill"], "epochs": 1, "lr": 3e-3, "batch_size": 8, "checkpoint_every": 2,
               "eval_every": None, "warmup_steps": 0, "temperature": 1.0}
    cfg = Distill(**section)
    calls = {"n": 0}

    def crash_at_4(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return cross_entropy_loss(*args)

    def left_checkpoint(out):
        calls["n"] = 0
        with pytest.raises(RuntimeError):
            train_classifier(build_model(SPEC, tok), rows, out_dir=out, settings=cfg, loss_fn=crash_at_4)
        assert (out / "checkpoint").exists()

    left_checkpoint(tmp_path / "a")
    m = train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "a", settings=Distill(**{**section, "temperature": 2.0}))
    assert m["resumed_from_step"] is None and m["steps"] == 5
    left_checkpoint(tmp_path / "b")
    m = train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id, sample_weight=np.linspace(0.5, 1.5, 40)),
                         out_dir=tmp_path / "b", settings=cfg)
    assert m["resumed_from_step"] is None
    left_checkpoint(tmp_path / "c")                                                # control: the same run resumes
    m = train_classifier(build_model(SPEC, tok), rows, out_dir=tmp_path / "c", settings=Distill(**{**section, "checkpoint_every": 3}))
    assert m["resumed_from_step"] == 2


def test_stale_checkpoint_from_other_settings_is_ignored(tmp_path, tok):
    ids, y = make_task(24, len(tok), seed=2)
    cfg = {"epochs": 1, "lr": 1e-3, "batch_size": 8}
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"fingerprint": "other"}))
    m = train_classifier(build_model(SPEC, tok), TrainSet(ids, y, tok.pad_token_id), out_dir=tmp_path, settings=settings(**cfg))
    assert m["resumed_from_step"] is None and m["steps"] == 3


def _worker(tok_dir: Path, out: Path, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(TESTS / "train_worker.py"), str(tok_dir), str(out), str(sleep_s)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, tok_dir):
    """Kill a training process (SIGKILL) once a checkpoint exists, rerun it: same final adapter."""
    killed = _worker(tok_dir, tmp_path / "killed", sleep_s=0.15)
    straight = _worker(tok_dir, tmp_path / "straight", sleep_s=0.0)  # runs meanwhile
    deadline = time.time() + 120     # two workers import torch/transformers/peft on 2 cores first
    while not (tmp_path / "killed" / "checkpoint").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "final").exists()  # it really died mid-training
    step = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["global_step"]
    assert 2 <= step < 10
    rerun = _worker(tok_dir, tmp_path / "killed", sleep_s=0.0)
    for p in (rerun, straight):
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()[-2000:]
    m = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert m["resumed_from_step"] == step and m["steps"] == 10
    assert_same_adapter(tmp_path / "killed" / "final", tmp_path / "straight" / "final")
