"""Step 2.5 runs its model once per filtering model, not once per fold: `filter-score` scores every
competition + external row with the post-pretrained filter model, and each fold's `filter-argmax`
only reads those scores (a CPU step that builds no model). Real tiny steps in a tmp root."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lmsys.config import load_config
from lmsys.paths import Layout

FOLDS = 3


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory):
    import lmsys.models
    from lmsys.steps.recipe import tasks_of, run_step
    root = tmp_path_factory.mktemp("filter-root")
    cfg = load_config("tiny", {"models.teachers": ["llama"], "folds.n_folds": FOLDS,
                               "demo.rows": 240, "demo.external_rows": 60, "demo.ut_rows": 80, "demo.test_rows": 20,
                               "filter_argmax.threshold": 0.34})   # low: some rows are removed by the tiny model
    cfg["root"] = str(root)
    layout = Layout("tiny", root)
    builds = []
    real_build = lmsys.models.build_model
    with pytest.MonkeyPatch.context() as mp:   # count model builds, the real function still runs
        mp.setattr(lmsys.models, "build_model", lambda spec, *a, **k: builds.append(spec["name"]) or real_build(spec, *a, **k))
        ran = []
        for name, keys in tasks_of(cfg):
            if name in ("demo-data", "prepare", "folds", "tokenizer", "post-pretrain", "filter-score", "filter-argmax"):
                before = len(builds)
                run_step(name, cfg, layout, **keys)
                ran.append((name, keys, len(builds) - before))
    return cfg, layout, ran


def test_plan_has_one_filter_score_per_filtering_model():
    from lmsys.steps.recipe import STEPS, tasks_of
    for n_folds in (3, 5):
        cfg = load_config("tiny", {"folds.n_folds": n_folds})
        tasks = tasks_of(cfg)
        assert [k for n, k in tasks if n == "filter-score"] == [{"model": cfg["models"]["teachers"][0]}]
        assert [k["fold"] for n, k in tasks if n == "filter-argmax"] == list(range(n_folds))
    assert STEPS["filter-score"].gpu and not STEPS["filter-argmax"].gpu


def test_filter_model_runs_once_and_folds_read_its_scores(filtered_run):
    """One model build and one scoring pass over all rows; the folds build nothing; each fold's kept
    and removed rows follow the threshold on the scores; probabilities equal scoring the fold alone."""
    cfg, layout, ran = filtered_run
    builds = {name: sum(b for n, _, b in ran if n == name) for name in ("filter-score", "filter-argmax")}
    assert builds == {"filter-score": 1, "filter-argmax": 0}
    assert sum(n == "filter-score" for n, _, _ in ran) == 1 and sum(n == "filter-argmax" for n, _, _ in ran) == FOLDS
    scores = pd.read_parquet(layout.filter_scores("llama"))
    from lmsys.steps.common import competition_and_external, fold_tables
    assert len(scores) == len(competition_and_external(layout)) and not scores["id"].duplicated().any()
    assert not (layout.filter_scores("llama").parent / ".llama.parquet.shards").exists()   # shards removed
    s = scores.set_index("id")
    removed_total = 0
    for k in range(FOLDS):
        train, _ = fold_tables(layout, k)
        rep = json.loads((layout.filtered(k) / "report.json").read_text())
        p = s.loc[train["id"], ["p_a", "p_b", "p_tie"]].to_numpy()
        drop = (p.argmax(1) != train["label"].to_numpy()) & (p.max(1) >= 0.34)
        kept = set(pd.read_csv(layout.filtered(k) / "train_ids.csv", dtype={"id": str})["id"])
        assert kept == set(train["id"][~drop]) and rep["rows_removed"] == int(drop.sum())
        removed_total += rep["rows_removed"]
    assert removed_total > 0
    # the scores of one fold's rows equal what the old per-fold pass computed on those rows alone
    from lmsys.infer import predict_logits
    from lmsys.metrics import softmax
    from lmsys.steps import common
    train, _ = fold_tables(layout, 0)
    tok, net = common.build(cfg, layout, "llama", init_adapter=common.adapter(layout.post_pretrain("llama")), trainable=False)
    alone = softmax(predict_logits(net, common.encode(cfg, train, tok, cfg["text"]["train_max_length"]), tok.pad_token_id,
                                   cfg["teacher_logits"]["batch_size"]))
    np.testing.assert_allclose(s.loc[train["id"], ["p_a", "p_b", "p_tie"]].to_numpy(), alone, atol=1e-5)


def test_fold_without_scores_is_an_error(filtered_run, tmp_path):
    from lmsys.steps.recipe import run_step
    cfg, layout, _ = filtered_run
    scores = pd.read_parquet(layout.filter_scores("llama"))
    scores.iloc[5:].to_parquet(layout.filter_scores("llama"), index=False)
    try:
        with pytest.raises(ValueError, match="no score for .* training rows of fold 0.*rerun filter-score"):
            run_step("filter-argmax", cfg, layout, fold=0)
    finally:
        scores.to_parquet(layout.filter_scores("llama"), index=False)
