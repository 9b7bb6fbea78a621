"""Step 2: fold assignment of the prepared competition rows (+ external rows as fold -1)."""
from __future__ import annotations

import pandas as pd

from lmsys.data.folds import make_folds
from lmsys.io import write_json, write_table
from lmsys.paths import Layout
from lmsys.steps import StepResult


def fold_summary(folds: pd.DataFrame, labels: pd.Series) -> dict:
    """Rows and class shares per fold (competition rows only)."""
    comp = folds[folds["fold"] >= 0].assign(label=labels.values[: (folds["fold"] >= 0).sum()])
    out = {}
    for k, g in comp.groupby("fold"):
        shares = g["label"].value_counts(normalize=True).reindex([0, 1, 2], fill_value=0.0)
        out[int(k)] = {"rows": len(g), "share_a": float(shares[0]), "share_b": float(shares[1]),
                       "share_tie": float(shares[2])}
    return out


def run_folds(cfg: dict, layout: Layout) -> StepResult:
    train = pd.read_parquet(layout.prepared / "train.parquet")
    external = pd.read_parquet(layout.prepared / "external.parquet")
    f = cfg["folds"]
    folds = make_folds(train, f["n_folds"], f["seed"], external)
    write_table(folds, layout.folds_csv)
    summary = {"n_folds": f["n_folds"], "external_rows": int((folds["fold"] < 0).sum()),
               "folds": fold_summary(folds, train["label"])}
    write_json(summary, layout.folds_csv.with_name("summary.json"))
    return StepResult(outputs=[layout.folds_csv.parent], metrics=summary)


def active_folds(cfg: dict) -> list[int]:
    """Folds the pipeline runs: folds.use, or all."""
    use = cfg["folds"]["use"]
    return list(range(cfg["folds"]["n_folds"])) if use is None else [int(k) for k in use]
