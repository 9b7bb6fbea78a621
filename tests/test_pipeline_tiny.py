"""Integration: the whole recipe, steps 0 -> 9, for real on the `tiny` profile and the demo data
(random-init Llama/Qwen2 teachers, Gemma2 student, GPTQ 8-bit on), in a temporary root.

One run is shared by the assertions (session fixture): it takes a few minutes on 2 cores.
The steps run in the flow's order (lmsys.steps.recipe.tasks_of) but without Prefect, each through
lmsys.steps.recipe.run_step, which hands a step only the keys its recipe entry declares (lmsys.config.for_step:
reading any other key raises): the run completing is the check that every step declares what it reads. The
Prefect flow itself is tested in tests/orchestration/.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest

from lmsys.config import load_config
from lmsys.data.schema import LOGIT_COLUMNS, SUBMISSION_COLUMNS
from lmsys.paths import Layout

SECRET = "hf_TESTSECRET_do_not_leak_4242"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from lmsys.steps.recipe import tasks_of, run_step
    root = tmp_path_factory.mktemp("tiny-root")
    cfg = load_config("tiny", {"quantize.enabled": True})
    cfg["root"] = str(root)
    layout = Layout("tiny", root)
    log_file = root / "run.log"
    handler, root_logger = logging.FileHandler(log_file), logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = SECRET            # must never reach a log or an artifact
    results = {}
    try:
        for name, keys in tasks_of(cfg):
            results[(name, tuple(sorted(keys.items())))] = run_step(name, cfg, layout, **keys)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
        handler.close()
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old
    return cfg, layout, results, log_file


def test_every_step_ran_on_the_params_it_declares(tiny_run):
    """A key a step reads but does not declare would be left out of its cache key (and its DVC params):
    a change of it would not rerun the step. run_step gives each step only its declared keys (any other
    read raises UndeclaredKey, tests/test_config.py), so every task of the run completing proves the
    declarations hold for the tiny profile's code paths (quantize included)."""
    cfg, _, results, _ = tiny_run
    assert [n for n, _ in results] == [n for n, _ in plan_of(cfg)]
    assert ("quantize", ()) in results


def plan_of(cfg: dict):
    from lmsys.steps.recipe import tasks_of
    return tasks_of(cfg)


def test_teacher_steps_outputs(tiny_run):
    cfg, layout, results, _ = tiny_run
    for m in cfg["models"]["teachers"]:
        assert (layout.post_pretrain(m) / "adapter" / "adapter_config.json").exists()
        for k in range(cfg["folds"]["n_folds"]):
            rep = json.loads((layout.filtered(k) / "report.json").read_text())
            assert rep["rows_in"] == rep["rows_kept"] + rep["rows_removed"]      # zero is reported too
            assert sum(rep["removed_per_class"].values()) == rep["rows_removed"]
            metrics = json.loads((layout.teacher(m, k) / "metrics.json").read_text())
            assert metrics["steps"] > 0 and metrics["best_val_log_loss"] is not None


def test_logits_one_finite_row_per_input(tiny_run):
    cfg, layout, _, _ = tiny_run
    from lmsys.steps.common import filtered_train, fold_tables
    for m in cfg["models"]["teachers"]:
        for k in range(cfg["folds"]["n_folds"]):
            lg = pd.read_parquet(layout.logits(m, k))
            assert np.isfinite(lg[LOGIT_COLUMNS].to_numpy()).all()
            assert not lg.duplicated(["id", "swapped", "split"]).any()
            train, (_, val) = filtered_train(cfg, layout, k), fold_tables(layout, k)
            assert (lg["split"] == "train").sum() == len(train)              # originals + swapped copies
            assert set(lg.loc[lg["split"] == "val", "id"]) == set(val["id"])


def test_training_beats_class_prior(tiny_run):
    """The demo labels carry a learnable signal, and the student (the model the pipeline ships) beats
    the class prior by more than the rows' noise: the paired bootstrap 95% interval of (prior's row
    loss - student's row loss) over the out-of-fold rows lies above 0 (the main job's run: +0.025,
    [0.015, 0.036]). The teachers learn less at this size (llama +0.015 [0.003, 0.027], qwen +0.000
    [-0.005, 0.006]: issue 10), so for them only the point estimate is checked."""
    from lmsys import metrics
    from lmsys.steps import serve
    cfg, layout, _, _ = tiny_run
    m = json.loads((layout.reports / "metrics.json").read_text())
    train = pd.read_parquet(layout.prepared / "train.parquet")["label"].to_numpy()
    prior = np.bincount(train, minlength=3) / len(train)
    per_fold = serve._oof_student(cfg, layout, tta=True)
    p, y = (np.concatenate([v[i] for v in per_fold.values()]) for i in (0, 1))
    gain = metrics.paired_bootstrap(metrics.row_losses(np.tile(prior, (len(y), 1)), y), metrics.row_losses(p, y))
    assert gain["n"] == len(train) and gain["lo"] > 0, gain        # every row out of fold once
    assert m["student_oof_log_loss"] == pytest.approx(metrics.log_loss(p, y), abs=1e-6)
    assert m["teacher_llama_oof_log_loss"] < m["class_prior_log_loss"]
    assert m["demo_bayes_train"] < m["class_prior_log_loss"] - 0.1


def test_submission_valid(tiny_run):
    _, layout, _, _ = tiny_run
    sub = pd.read_csv(layout.submission)
    test = pd.read_parquet(layout.prepared / "test.parquet")
    assert list(sub.columns) == SUBMISSION_COLUMNS
    assert sorted(sub["id"].astype(str)) == sorted(test["id"]) and sub["id"].is_unique
    np.testing.assert_allclose(sub[SUBMISSION_COLUMNS[1:]].sum(axis=1), 1.0, atol=1e-6)


def test_report_and_plots(tiny_run):
    _, layout, _, _ = tiny_run
    report = (layout.reports / "report.md").read_text()
    for png in ("reliability.png", "fold_losses.png", "confusion.png"):
        assert (layout.reports / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert "Quantisation" in report and "calibrated" in report


def test_quantized_model_is_final_and_keeps_head(tiny_run):
    _, layout, _, _ = tiny_run
    q = json.loads((layout.quantized / "quantize.json").read_text())
    assert q["bits"] == 8 and np.isfinite(q["log_loss_quantized"])
    assert json.loads(layout.last_run.read_text())["model"] == str(layout.quantized)


def test_tta_exactly_symmetric_on_trained_model(tiny_run, tmp_path):
    """Predicting the A/B-swapped test set gives p_A and p_B exchanged and the same p_tie."""
    cfg, layout, _, _ = tiny_run
    from lmsys.data.transforms import swap_ab
    from lmsys.steps.serve import load_final, predict_probs
    tok, model = load_final(layout.ensemble)
    test = pd.read_parquet(layout.prepared / "test.parquet")
    args = (cfg["text"], cfg["text"]["infer_max_length"], cfg["predict"]["batch_size"])
    p, plain = predict_probs(model, tok, test, *args)
    ps, _ = predict_probs(model, tok, swap_ab(test), *args)
    np.testing.assert_allclose(ps[:, [1, 0, 2]], p, atol=1e-6)
    assert np.abs(plain - p).max() > 1e-4          # the model itself is not symmetric: TTA did the work


def test_calibration_step_metrics(tiny_run):
    cfg, layout, _, _ = tiny_run
    for m in cfg["models"]["teachers"]:
        c = json.loads(layout.calibration(m).read_text())
        assert c["method"] == "vector" and c["cross_fitted"]          # fold k scaled by params fitted without it
        for k, p in c["folds"].items():
            assert int(k) not in p["fitted_on_folds"] and p["nll_after"] <= p["nll_before"] + 1e-9
        assert c["heldout_log_loss_after"] < c["heldout_log_loss_before"] + 0.02
    metrics = json.loads((layout.reports / "metrics.json").read_text())
    assert metrics["test_rows_answered_by_fallback"] == 0                            # none on the demo
    assert "held out" in (layout.reports / "report.md").read_text()
    assert (layout.post_pretrain(cfg["models"]["student"]) / "adapter" / "adapter_config.json").exists()


def test_predict_cli_default_model(tiny_run, tmp_path):
    """`lmsys predict --test` on a Kaggle test.csv with the last run's final model."""
    cfg, layout, _, _ = tiny_run
    from lmsys.data.demo import demo_paths
    from lmsys.steps.serve import predict_file
    out, test = tmp_path / "sub.csv", demo_paths(layout.demo_dir)["test"]
    predict_file(test, out, None, cfg)
    sub, want = pd.read_csv(out, dtype={"id": str}), pd.read_csv(test, dtype={"id": str})
    assert list(sub.columns) == SUBMISSION_COLUMNS and sorted(sub["id"]) == sorted(want["id"])   # every test id once
    np.testing.assert_allclose(sub[SUBMISSION_COLUMNS[1:]].sum(axis=1), 1.0, atol=1e-6)
    # the default model is the pipeline's final one: the same probabilities as the run's submission
    run = pd.read_csv(layout.submission, dtype={"id": str}).set_index("id").loc[sub["id"]]
    np.testing.assert_allclose(sub[SUBMISSION_COLUMNS[1:]].to_numpy(), run.to_numpy(), atol=1e-5)


def test_secret_never_written(tiny_run):
    _, layout, _, log_file = tiny_run
    leaks = [str(p) for p in layout.root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert log_file.stat().st_size > 0 and SECRET not in log_file.read_text()


def test_distill_step_with_ema_information_gain_weights(tiny_run, tmp_path):
    """Step 5 with distill.info_gain_baseline: ema, on a copy of the run's root: it trains with the
    EMA information-gain weights (lmsys.distill.EmaInfoGainWeights) and reports them (mean 1)."""
    import shutil

    from lmsys.steps.recipe import run_step
    _, layout, results, _ = tiny_run
    root = tmp_path / "root"
    shutil.copytree(layout.root, root, ignore=shutil.ignore_patterns("run.log"))
    over = {"distill.info_gain_weights": True, "distill.info_gain_baseline": "ema", "distill.max_steps": 6}
    cfg2 = {**load_config("tiny", {"quantize.enabled": True, **over}), "root": str(root)}
    res = run_step("distill", cfg2, Layout("tiny", root), fold=0)
    w = res.metrics["sample_weights"]
    assert w["baseline"] == "ema" and w["mean"] == pytest.approx(1.0) and w["min"] < w["max"], w
    assert res.metrics["steps"] == 6 and np.isfinite(res.metrics["best_val_log_loss"])
    assert results[("distill", (("fold", 0),))].metrics["sample_weights"] is None     # off in the main run
