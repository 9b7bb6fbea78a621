"""Result integrity (issue 11): every test id answered, no calibration leak, fold and sample weights
that do something, the recipe's data rules, checkpoints without pickle. Each test fails on the code
before the fix (d1f6264)."""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lmsys.config import load_config
from lmsys.data import schema
from lmsys.paths import Layout

GOOD = {"prompt": '["what is two plus two"]', "response_a": '["four"]', "response_b": '["it is 4"]'}


def write_test_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=schema.KAGGLE_TEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def broken_test_rows() -> tuple[list[dict], dict[str, str]]:
    """Two readable rows and three that prepare quarantines; {id: reason} of the latter."""
    rows = [{"id": "101", **GOOD}, {"id": "102", **GOOD, "response_b": '["no"]'},
            {"id": "103", **GOOD, "response_a": "[null]"},          # empty in every turn
            {"id": "104", **GOOD, "response_b": '[""]'},
            {"id": "105", **GOOD, "prompt": '["unterminated'}]       # broken JSON
    return rows, {"103": "empty_response", "104": "empty_response", "105": "bad_json"}


# ---------------------------------------------------------------- every test id answered

def test_lmsys_predict_answers_every_id_and_names_the_fallback_rows(tmp_path, final_model):
    rows, bad = broken_test_rows()
    test = write_test_csv(tmp_path / "test.csv", rows)
    r = subprocess.run([sys.executable, "-m", "lmsys.cli", "predict", "--test", str(test), "--model",
                        str(final_model), "--out", str(tmp_path / "sub.csv")], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr                      # a result with warnings
    assert "Traceback" not in r.stderr
    for i, (rid, reason) in enumerate(bad.items()):
        assert f"row {2 + i} (id {rid}): {reason}" in r.stderr
    sub = pd.read_csv(tmp_path / "sub.csv", dtype={"id": str})
    assert sorted(sub["id"]) == [r["id"] for r in rows] and not sub["id"].duplicated().any()
    p = sub.set_index("id")[schema.WINNER_COLUMNS]
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(p.loc[list(bad)].to_numpy(), [[0.5, 0.3, 0.2]] * 3)   # the model dir's prior


def test_predict_step_answers_quarantined_test_rows_and_checks_raw_ids(tmp_path, demo_dir, final_model):
    """prepare lists the unreadable test rows; step 8 answers them with the class prior, flags them
    with the reason and checks the submission against the raw test file's ids."""
    import shutil

    from lmsys.data.demo import demo_paths
    from lmsys.steps.prepare import run_prepare
    from lmsys.steps.serve import run_predict
    rows, bad = broken_test_rows()
    test = write_test_csv(tmp_path / "test.csv", rows)
    p = demo_paths(demo_dir)
    cfg = load_config("tiny", {"data.train": str(p["train"]), "data.test": str(test)})
    cfg["root"] = str(tmp_path)
    layout = Layout("tiny", tmp_path)
    run_prepare(cfg, layout)
    report = json.loads((layout.prepared / "report.json").read_text())
    assert report["test_fallback"] == {"rows": 3, "reasons": {"bad_json": 1, "empty_response": 2}}
    shutil.copytree(final_model, layout.ensemble)
    res = run_predict(cfg, layout)
    assert res.metrics["fallback_rows"] == 3 and res.metrics["rows"] == 5
    probs = pd.read_parquet(layout.predictions / "test_probs.parquet").set_index("id")
    assert probs["fallback_reason"].to_dict() == {"101": "", "102": "", **bad}
    train_labels = pd.read_parquet(layout.prepared / "train.parquet")["label"]
    prior = np.bincount(train_labels, minlength=3) / len(train_labels)
    np.testing.assert_allclose(probs.loc["105", ["p_a", "p_b", "p_tie"]].to_numpy(dtype=float), prior)
    sub = pd.read_csv(layout.submission, dtype={"id": str})
    assert sorted(sub["id"]) == sorted(r["id"] for r in rows)


def test_final_check_refuses_a_submission_missing_or_repeating_an_id():
    from lmsys.steps.serve import check_submission, submission
    sub = submission(["1", "2"], np.full((2, 3), 1 / 3))
    check_submission(sub, ["1", "2"], "t")
    with pytest.raises(ValueError, match=r"ids missing 1 \(first: \['3'\]\)"):
        check_submission(sub, ["1", "2", "3"], "t")
    with pytest.raises(ValueError, match="ids repeated"):
        check_submission(pd.concat([sub, sub.iloc[:1]]), ["1", "2"], "t")
    with pytest.raises(ValueError, match="not summing to 1"):
        check_submission(submission(["1", "2"], np.array([[0.5, 0.5, 0.5], [1, 0, 0]])), ["1", "2"], "t")


# ---------------------------------------------------------------- checkpoints without pickle

class _Marker:
    """Unpickling this creates a file: proof that a checkpoint load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_optimizer_state_is_loaded_without_unpickling_objects(tmp_path):
    import torch

    from lmsys.train import load_checkpoint, save_checkpoint
    net = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    net(torch.ones(2, 3)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint(tmp_path / "ck", net, opt, sched, {"step": 1})
    torch.load(tmp_path / "ck" / "optim.pt", weights_only=True)         # plain tensors and containers only
    assert load_checkpoint(tmp_path / "ck", net, opt, sched) == {"step": 1}

    marker = tmp_path / "ran-code"
    with open(tmp_path / "ck" / "optim.pt", "wb") as f:
        pickle.dump({"optimizer": _Marker(marker), "scheduler": {}, "rng": {}, "weights": None}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "ck", net, opt, sched)
    assert not marker.exists()


# ---------------------------------------------------------------- calibration: no leak

def _fake_logits(layout: Layout, model: str, folds: int, seed: int = 0) -> None:
    """Teacher logits files as step 4 writes them: per fold, training rows and validation rows, both
    orders, mis-scaled logits that carry the label."""
    rng = np.random.default_rng(seed)
    for k in range(folds):
        parts = []
        for split, n in (("train", 40), ("val", 30)):
            y = rng.integers(0, 3, n)
            z = 2.5 * np.eye(3)[y] + rng.normal(size=(n, 3)) * 1.5 + [0.8, 0.0, -0.8]
            ids = [f"{split}{k}-{i}" for i in range(n)]
            for swapped in (False, True):
                zz = z[:, [1, 0, 2]] if swapped else z
                yy = np.array([1, 0, 2])[y] if swapped else y
                parts.append(pd.DataFrame({"id": ids, "swapped": swapped, "split": split, "label": yy,
                                           "logit_a": zz[:, 0], "logit_b": zz[:, 1], "logit_tie": zz[:, 2]}))
        path = layout.logits(model, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(parts, ignore_index=True).to_parquet(path)


def _student_targets(cfg, layout, fold: int) -> np.ndarray:
    from lmsys.steps.student import soft_targets
    f = pd.read_parquet(layout.logits("llama", fold))
    return soft_targets(cfg, layout, fold, f[f["split"] == "train"][["id", "swapped"]].reset_index(drop=True))


def test_student_targets_do_not_depend_on_their_folds_validation_labels(tmp_path):
    """Permuting fold k's validation labels leaves student k's soft targets (and fold k's calibrated
    held-out logits) unchanged; the other folds' targets do change (their fit uses those labels)."""
    from lmsys.steps.student import run_calibrate
    cfg = load_config("tiny", {"models.teachers": ["llama"], "folds.n_folds": 3})
    layout = Layout("tiny", tmp_path)
    _fake_logits(layout, "llama", 3)
    run_calibrate(cfg, layout, "llama")
    before = {k: _student_targets(cfg, layout, k) for k in range(3)}
    val_before = pd.read_parquet(layout.calibrated_logits("llama", 1)).query("split == 'val'")

    path = layout.logits("llama", 1)
    f = pd.read_parquet(path)
    val = f["split"] == "val"
    f.loc[val, "label"] = np.random.default_rng(1).permutation(f.loc[val, "label"].to_numpy())
    f.to_parquet(path)
    run_calibrate(cfg, layout, "llama")

    np.testing.assert_array_equal(_student_targets(cfg, layout, 1), before[1])
    val_after = pd.read_parquet(layout.calibrated_logits("llama", 1)).query("split == 'val'")
    np.testing.assert_array_equal(val_after[schema.LOGIT_COLUMNS].to_numpy(), val_before[schema.LOGIT_COLUMNS].to_numpy())
    assert not np.allclose(_student_targets(cfg, layout, 0), before[0])
    params = json.loads(layout.calibration("llama").read_text())
    assert params["cross_fitted"] and params["folds"]["1"]["fitted_on_folds"] == [0, 2]


def test_calibration_with_one_fold_is_the_flagged_identity(tmp_path):
    from lmsys.steps.student import run_calibrate
    cfg = load_config("tiny", {"models.teachers": ["llama"], "folds.use": [0]})
    layout = Layout("tiny", tmp_path)
    _fake_logits(layout, "llama", 1)
    res = run_calibrate(cfg, layout, "llama")
    assert res.metrics["heldout_log_loss_after"] == pytest.approx(res.metrics["heldout_log_loss_before"])
    p = json.loads(layout.calibration("llama").read_text())["folds"]["0"]
    assert p["fallback"] and "one active fold" in p["reason"]


# ---------------------------------------------------------------- fold and sample weights

def test_fold_weights_follow_the_gains_and_are_not_uniform():
    from lmsys.ensemble import fold_weights
    w = fold_weights([0.01, 0.02, 0.03], tau=1.0)                 # gains of about 0.01 nats
    assert w[0] < w[1] < w[2] and w[2] / w[0] > 5                 # the old softmax of r - mean(r): within 1%
    np.testing.assert_allclose(fold_weights([0.11, 0.12, 0.13]), w)              # a shift changes nothing
    np.testing.assert_allclose(fold_weights([1.0, 2.0, 3.0]), w)                 # nor does the scale
    assert fold_weights([0.01, 0.02, 0.03], tau=5.0)[2] < w[2]                   # tau softens
    np.testing.assert_allclose(fold_weights([0.02] * 4), 0.25)


def test_info_gain_weights_follow_gains():
    from lmsys.distill import info_gain_weights
    z = np.log(np.array([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.4, 0.3, 0.3]]))
    w = info_gain_weights(z, [0, 0, 0], [1 / 3] * 3)
    assert w[0] > w[1] > w[2] and w.mean() == pytest.approx(1) and w.max() / w.min() > 1.5


def test_info_gain_default_is_the_ema_baseline_and_weighs_hard_rows_higher():
    """'Hard samples' = rows the teacher explains and the student (an EMA of its predictions) does
    not yet: with the default baseline those weigh more; the prior baseline would weigh the row the
    teacher finds easiest most, whatever the student knows."""
    from lmsys.distill import EmaInfoGainWeights
    from lmsys.steps.student import sample_weights
    cfg = load_config("tiny", {"distill.info_gain_weights": True})
    assert cfg["distill"]["info_gain_baseline"] == "ema"
    teacher = np.log(np.array([[0.8, 0.1, 0.1], [0.7, 0.15, 0.15]]))
    y = np.array([0, 0])
    w = sample_weights(cfg, teacher[:, None, :], y)
    assert isinstance(w, EmaInfoGainWeights)
    w.observe(np.array([0, 1]), np.array([[0.95, 0.03, 0.02], [0.1, 0.8, 0.1]]))   # row 0 learnt, row 1 not
    hard_easy = w.batch(np.array([1, 0]))
    assert hard_easy[0] > hard_easy[1]
    prior = sample_weights(load_config("tiny", {"distill.info_gain_weights": True,
                                                "distill.info_gain_baseline": "prior"}), teacher[:, None, :], y)
    assert prior[0] > prior[1]                                    # the prior baseline favours the easy row


def test_fold_gains_score_every_fold_student_on_the_same_held_out_rows(tmp_path, tok_dir, demo_dir):
    """The weighted ensemble's r_k: each fold student on step 1's held-out UT rows (one common set)."""
    import shutil

    from lmsys.data.demo import demo_paths
    from lmsys.data.validate import validate_file
    from lmsys.models import build_model
    from lmsys.steps import common
    from lmsys.steps.student import fold_gains
    from lmsys.steps.teachers import post_pretrain_rows
    cfg = load_config("tiny", {"models.specs.gemma": {"kind": "tiny-gemma2", "hidden": 32, "layers": 1, "heads": 2,
                                                       "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}})
    layout = Layout("tiny", tmp_path)
    shutil.copytree(tok_dir, layout.tokenizer)
    layout.prepared.mkdir(parents=True)
    validate_file(demo_paths(demo_dir)["ut"], source="ultrafeedback").clean.to_parquet(layout.prepared / "ut.parquet")
    for k, seed in ((0, 1), (1, 2)):
        tok = common.tokenizer(cfg, layout, "gemma")
        net = build_model({**common.spec(cfg, "gemma"), "seed": seed}, tok)
        net.save_pretrained(common.adapter(layout.student(k)))
    g = fold_gains(cfg, layout, [0, 1])
    assert g["rows"] == len(post_pretrain_rows(cfg, layout)[1]) == 10 and "held out" in g["row_set"]
    assert len(g["gains"]) == 2 and g["gains"][0] != g["gains"][1]


# ---------------------------------------------------------------- the recipe where it was skipped

def test_teacher_targets_are_computed_on_the_students_text(tok):
    """Step 4's training rows are tokenised as the student trains on them (train_max_length); the
    validation rows as at inference (infer_max_length)."""
    from lmsys.steps import common
    from lmsys.steps.teachers import logit_inputs
    cfg = load_config("tiny", {"text.train_max_length": 64, "text.infer_max_length": 200})
    long = " ".join(["alpha beta gamma delta"] * 80)
    rows = pd.DataFrame({"prompt": [["q"]] * 2, "response_a": [[long]] * 2, "response_b": [["short"]] * 2,
                         "split": ["train", "val"]})
    ids = logit_inputs(cfg, rows, tok)
    assert len(ids[0]) <= 64 < len(ids[1]) <= 200
    assert ids[0] == common.encode(cfg, rows.iloc[:1], tok, 64)[0]


def test_student_post_pretraining_is_a_step_before_distillation():
    from lmsys.steps.recipe import STEPS, tasks_of
    cfg = load_config("tiny")
    layout = Layout("tiny")
    order = [n for n, _ in tasks_of(cfg)]
    assert STEPS["post-pretrain-student"].number == "1"
    assert order.index("post-pretrain-student") < order.index("distill")
    assert layout.post_pretrain("gemma") in STEPS["distill"].inputs(cfg, layout, fold=0)


def test_external_rows_are_deduplicated_on_the_prompt(tmp_path, demo_dir):
    from lmsys.data.demo import demo_paths
    from lmsys.steps.prepare import run_prepare
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]   # noqa: E731
    ext = [{"question_id": f"q{i}", "model_a": "x", "model_b": "y", "winner": "model_a",
            "conversation_a": conv(q, f"answer {i}"), "conversation_b": conv(q, f"other {i}")}
           for i, q in enumerate(["same prompt", "same prompt", "same prompt", "another prompt"])]
    (tmp_path / "ext.jsonl").write_text("\n".join(json.dumps(r) for r in ext))
    p = demo_paths(demo_dir)
    cfg = load_config("tiny", {"data.train": str(p["train"]), "data.test": str(p["test"]),
                               "data.external": [str(tmp_path / "ext.jsonl")]})
    layout = Layout("tiny", tmp_path)
    run_prepare(cfg, layout)
    report = json.loads((layout.prepared / "report.json").read_text())
    assert report["removed"]["external:duplicate_prompt"] == 2
    assert report["external_dedup_prompt"] == {"duplicate_prompts_removed": 2, "rows_kept": 2}
    assert sorted(pd.read_parquet(layout.prepared / "external.parquet")["id"]) == ["q0", "q3"]


def test_full_profile_refuses_the_demo_data_unless_asked(tmp_path):
    from lmsys.steps.prepare import check_demo_allowed, run_demo_data
    with pytest.raises(ValueError, match="would train on the demo data"):
        run_demo_data(load_config("full"), Layout("full", tmp_path))
    assert not (tmp_path / "data").exists()
    check_demo_allowed(load_config("full", {"data.allow_demo": True}))
    check_demo_allowed(load_config("tiny"))


def test_convert_ut_openbmb_and_binarized(tmp_path):
    from lmsys.data.ultrafeedback import convert_ultrafeedback
    from lmsys.data.validate import validate_file
    comp = lambda m, r, s: {"model": m, "response": r, "overall_score": s, "fine-grained_score": s / 2}  # noqa: E731
    raw = pd.DataFrame([
        {"source": "x", "instruction": "Name a colour.", "models": [],
         "completions": [comp("m1", "red", 8.0), comp("m2", "blue", 6.5), comp("m3", "green", 7.0),
                         comp("m4", "teal", 7.0)]},
        {"source": "x", "instruction": "Count to two.", "models": [],
         "completions": [comp("m1", "1 2", 3.0), comp("m2", "one, two", 9.0), comp("m5", "", 1.0)]},
        {"source": "x", "instruction": "", "models": [], "completions": []}])
    out, info = convert_ultrafeedback(raw)
    assert info == {"schema": "openbmb", "rows_in": 3, "battles": 3, "skipped": {"no_instruction": 1},
                    "skipped_rows": {"no_instruction": [2]}}
    assert out[schema.WINNER_COLUMNS].to_numpy().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert out["model_a"].tolist() == ["m1", "m3", "m1"]
    out.to_csv(tmp_path / "ut.csv", index=False)
    v = validate_file(tmp_path / "ut.csv", source="ultrafeedback")
    assert len(v.clean) == 3 and not len(v.quarantine)

    msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    binar = pd.DataFrame([{"prompt": q, "chosen": msgs(q, "good"), "rejected": msgs(q, "bad"),
                           "score_chosen": sc, "score_rejected": sr}
                          for q, sc, sr in (("a?", 9.0, 4.0), ("b?", 8.0, 3.0), ("c?", 5.0, 5.0))])
    out, info = convert_ultrafeedback(binar)
    assert info["schema"] == "binarized" and info["battles"] == 3
    assert out[schema.WINNER_COLUMNS].to_numpy().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert json.loads(out["response_b"].iloc[1]) == ["good"]
    binar.to_json(tmp_path / "b.jsonl", orient="records", lines=True)
    r = subprocess.run([sys.executable, "-m", "lmsys.cli", "convert-ut", str(tmp_path / "b.jsonl"), "--out",
                        str(tmp_path / "b.parquet")], capture_output=True, text=True)
    assert r.returncode == 0 and "3 battles" in r.stdout, r.stderr
    assert len(validate_file(tmp_path / "b.parquet").clean) == 3
