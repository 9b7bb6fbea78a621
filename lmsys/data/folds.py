"""Step 2: K folds, stratified by label and grouped by prompt.

Validation rows come only from competition data; external rows get fold -1 and join every
fold's training part, except those sharing a prompt with that fold's validation rows (which
would leak the validation prompt into training).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lmsys.data import schema

EXTERNAL_FOLD = -1


def make_folds(competition: pd.DataFrame, n_folds: int, seed: int,
               external: pd.DataFrame | None = None) -> pd.DataFrame:
    """-> DataFrame id,fold (competition rows 0..K-1 in input order, then external rows -1).

    Raises ValueError when n_folds < 2, there are fewer distinct prompts than folds, or unlabelled rows."""
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2 (one fold leaves nothing to validate on), got {n_folds!r}")
    if (competition["label"] == schema.UNLABELLED).any():
        raise ValueError("folds need labelled competition rows; got unlabelled (test) rows")
    groups = competition["prompt"].map(schema.prompt_key)
    if groups.nunique() < n_folds:
        raise ValueError(f"{groups.nunique()} distinct prompts cannot fill {n_folds} folds")
    fold = np.full(len(competition), -2, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(competition)), competition["label"], groups)):
        fold[val] = k
    out = pd.DataFrame({"id": competition["id"].astype(str), "fold": fold})
    if external is not None and len(external):
        out = pd.concat([out, pd.DataFrame({"id": external["id"].astype(str), "fold": EXTERNAL_FOLD})],
                        ignore_index=True)
    return out


def fold_split(table: pd.DataFrame, folds: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train part, validation part) of fold k. `table` holds competition + external rows.

    External rows whose prompt appears in fold k's validation are left out of its training part."""
    fold_of = dict(zip(folds["id"].astype(str), folds["fold"]))
    f = table["id"].astype(str).map(fold_of)
    if f.isna().any():
        missing = table.loc[f.isna(), "id"].head(5).tolist()
        raise ValueError(f"rows without a fold (first: {missing}); rerun the folds step")
    val = table[f == k]
    val_prompts = set(val["prompt"].map(schema.prompt_key))
    train = table[(f != k) & ((f != EXTERNAL_FOLD) | ~table["prompt"].map(schema.prompt_key).isin(val_prompts))]
    return train.reset_index(drop=True), val.reset_index(drop=True)
