"""Step 2.5 filter-argmax on data where it must drop rows: a real root (demo data, prepare, folds)
and filter scores written by the test, so which rows the post-pretrained model gets confidently
wrong is known; the step must remove exactly the fold's confidently wrong training rows (p of the
wrong argmax >= filter_argmax.threshold), keep every other row, and never touch validation rows."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lmsys.config import load_config
from lmsys.paths import Layout

SMALL = {"folds.n_folds": 2, "models.teachers": ["llama"], "demo.rows": 120, "demo.test_rows": 20,
         "demo.external_rows": 30, "demo.ut_rows": 20, "filter_argmax.threshold": 0.9}


@pytest.fixture(scope="module")
def scored_root(tmp_path_factory):
    """(cfg, layout, scores): prepared demo data with folds, and filter scores where every 4th row is
    confidently wrong (p 0.95 on label+1), every 4th+1 exactly at the threshold on a wrong class
    (0.9: dropped, >=), every 4th+2 wrong but unsure (0.6: kept), the rest confidently right."""
    from lmsys.steps.common import competition_and_external, labels
    from lmsys.steps.recipe import run_step
    from lmsys.steps.teachers import filter_model
    root = tmp_path_factory.mktemp("filter-root")
    cfg = {**load_config("tiny", SMALL), "root": str(root)}
    layout = Layout("tiny", root)
    for step in ("demo-data", "prepare", "folds"):
        run_step(step, cfg, layout)
    rows = competition_and_external(layout)
    y = labels(rows)
    kind = np.arange(len(rows)) % 4                          # 0 wrong 0.95, 1 wrong 0.9, 2 wrong 0.6, 3 right
    conf = np.array([0.95, 0.9, 0.6, 0.95])[kind]
    pred = np.where(kind == 3, y, (y + 1) % 3)
    p = np.full((len(rows), 3), 0.0)
    p[np.arange(len(rows)), pred] = conf
    other = (pred + 1) % 3
    p[np.arange(len(rows)), other] = 1 - conf
    scores = pd.DataFrame({"id": rows["id"], "label": y, "p_a": p[:, 0], "p_b": p[:, 1], "p_tie": p[:, 2]})
    out = layout.filter_scores(filter_model(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(out)
    return cfg, layout, scores.assign(kind=kind).set_index("id")


@pytest.mark.parametrize("fold", [0, 1])
def test_filter_argmax_drops_exactly_the_confidently_wrong_training_rows(scored_root, fold):
    from lmsys.steps.common import filtered_train, fold_tables
    from lmsys.steps.recipe import run_step
    cfg, layout, scores = scored_root
    res = run_step("filter-argmax", cfg, layout, fold=fold)
    train, val = fold_tables(layout, fold)
    kind = scores.loc[train["id"], "kind"].to_numpy()
    want_removed = set(train["id"][kind <= 1])              # p >= 0.9 on a wrong class
    assert len(want_removed) > 0 and len(want_removed) < len(train)
    removed = pd.read_csv(layout.filtered(fold) / "removed.csv", dtype={"id": str})
    kept = pd.read_csv(layout.filtered(fold) / "train_ids.csv", dtype={"id": str})
    assert set(removed["id"]) == want_removed
    assert set(kept["id"]) == set(train["id"]) - want_removed
    assert not set(removed["id"]) & set(val["id"])           # validation rows are never filtered
    np.testing.assert_allclose(sorted(removed["confidence"]), sorted(scores.loc[list(want_removed), "kind"].map({0: 0.95, 1: 0.9})))
    report = json.loads((layout.filtered(fold) / "report.json").read_text())
    assert (report["rows_in"], report["rows_removed"], report["rows_kept"]) == (len(train), len(want_removed), len(train) - len(want_removed))
    per_class = scores.loc[list(want_removed), "label"].value_counts().reindex([0, 1, 2], fill_value=0).tolist()
    assert [report["removed_per_class"][c] for c in ("A", "B", "tie")] == per_class
    assert res.metrics == report
    # what the teacher trains on (originals + swapped copies) has none of the removed rows
    assert not set(filtered_train(cfg, layout, fold)["id"]) & want_removed


def test_threshold_above_every_confidence_drops_nothing(scored_root, tmp_path):
    from lmsys.steps.recipe import run_step
    cfg, layout, _ = scored_root
    res = run_step("filter-argmax", {**cfg, "filter_argmax": {"threshold": 0.96}}, layout, fold=0)
    assert res.metrics["rows_removed"] == 0 and res.metrics["rows_kept"] == res.metrics["rows_in"]
    run_step("filter-argmax", cfg, layout, fold=0)          # leave the module's root as the fixture made it
