"""Dedup, leak removal, swap, folds (grouped by prompt, stratified, deterministic), the folds CLI."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmsys.data import schema
from lmsys.data.folds import EXTERNAL_FOLD, fold_split, make_folds
from lmsys.data.transforms import dedupe, remove_leaks, swap_ab, with_swaps
from lmsys.data.validate import validate_file


def table(n, n_prompts, seed=0, source="kaggle", id0=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": [str(id0 + i) for i in range(n)], "source": source,
        "model_a": "ma", "model_b": "mb",
        "prompt": [[f"prompt {rng.integers(n_prompts)}"] for _ in range(n)],
        "response_a": [[f"a{id0 + i}"] for i in range(n)], "response_b": [[f"b{id0 + i}"] for i in range(n)],
        "label": rng.choice(3, n, p=[0.4, 0.35, 0.25]).astype("int64")})


def test_dedupe_and_leaks():
    t = table(10, 5)
    dup = pd.concat([t, t.iloc[[0]], t.iloc[[1]].assign(label=(t.iloc[1]["label"] + 1) % 3),
                     t.iloc[[2]].assign(response_a=[["new"]])], ignore_index=True)
    kept, removed = dedupe(dup)
    assert len(kept) + len(removed) == len(dup)
    assert removed["reason"].tolist() == ["duplicate_battle", "duplicate_id", "duplicate_id"]
    ext = table(4, 5, id0=100)
    ext.loc[0, ["prompt", "response_a", "response_b"]] = t.loc[3, ["prompt", "response_a", "response_b"]].values
    ext.at[1, "prompt"], ext.at[1, "response_a"], ext.at[1, "response_b"] = t.at[4, "prompt"], t.at[4, "response_b"], t.at[4, "response_a"]
    kept, leaks = remove_leaks(ext, t)
    assert sorted(leaks["id"]) == ["100", "101"] and len(kept) == 2


def test_swap():
    t = table(6, 3)
    s = swap_ab(t)
    assert (s["response_a"] == t["response_b"]).all() and (s["model_a"] == t["model_b"]).all()
    assert s["label"].tolist() == [{0: 1, 1: 0, 2: 2}[x] for x in t["label"]]
    assert s["swapped"].all()
    assert swap_ab(s)["label"].tolist() == t["label"].tolist()
    w = with_swaps(t)
    assert len(w) == 12 and w["swapped"].sum() == 6


def test_folds_grouped_stratified_deterministic():
    comp, ext = table(600, 60), table(50, 70, seed=1, source="arena33k", id0=10_000)
    f = make_folds(comp, 5, 7, ext)
    assert (f["fold"] == EXTERNAL_FOLD).sum() == 50 and set(f["fold"]) == {-1, 0, 1, 2, 3, 4}
    m = comp.assign(fold=f["fold"][:600].values, pk=comp["prompt"].map(schema.prompt_key))
    assert m.groupby("pk")["fold"].nunique().max() == 1
    whole = m["label"].value_counts(normalize=True)
    for _, g in m.groupby("fold"):
        assert (g["label"].value_counts(normalize=True) - whole).abs().max() < 0.08
    assert make_folds(comp, 5, 7, ext).equals(f)
    assert not make_folds(comp, 5, 8, ext).equals(f)
    both = pd.concat([comp, ext], ignore_index=True)
    for k in range(5):
        tr, va = fold_split(both, f, k)
        assert set(va["source"]) == {"kaggle"}
        assert not set(tr["prompt"].map(schema.prompt_key)) & set(va["prompt"].map(schema.prompt_key))
        assert len(tr) + len(va) <= len(both) and (tr["source"] == "arena33k").any()


def test_folds_cli_on_shared(shared_data, tmp_path):
    path = shared_data("vicuna80_human.csv")
    r = subprocess.run([sys.executable, "-m", "lmsys.cli", "folds", str(path), "--n-folds", "5", "--seed", "0",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f = pd.read_csv(tmp_path / "folds.csv", dtype={"id": str})
    t = validate_file(path).clean.merge(f, on="id")
    assert len(t) == 1760 and list(f.columns) == ["id", "fold"]
    assert t.assign(pk=t["prompt"].map(schema.prompt_key)).groupby("pk")["fold"].nunique().max() == 1
    whole = t["label"].value_counts(normalize=True)
    for _, g in t.groupby("fold"):
        assert (g["label"].value_counts(normalize=True) - whole).abs().max() <= 0.05


def test_make_folds_arguments_and_shape():
    """K = 2 is the smallest accepted; exactly K distinct prompts fill K folds; without external
    rows only competition rows; the frame has a fresh 0..N-1 index; the messages name the problem."""
    t = table(30, 3)
    two = make_folds(t, 2, seed=0)
    assert sorted(two["fold"].unique()) == [0, 1] and two["id"].tolist() == t["id"].tolist()
    three = make_folds(t, 3, seed=0)                           # exactly 3 distinct prompts, 3 folds
    assert sorted(three["fold"].unique()) == [0, 1, 2]
    with_ext = make_folds(t, 3, seed=0, external=table(4, 3, id0=100))
    assert with_ext.index.equals(pd.RangeIndex(34)) and with_ext["fold"].tolist()[-4:] == [EXTERNAL_FOLD] * 4
    for bad in (1, 0, 2.0, "2"):
        with pytest.raises(ValueError, match=r"^n_folds must be an integer >= 2 \(one fold leaves nothing to validate on\), got "
                                             + re.escape(repr(bad)) + "$"):
            make_folds(t, bad, seed=0)
    with pytest.raises(ValueError, match=r"^3 distinct prompts cannot fill 4 folds$"):
        make_folds(t, 4, seed=0)
    with pytest.raises(ValueError, match=r"^folds need labelled competition rows; got unlabelled \(test\) rows$"):
        make_folds(t.assign(label=schema.UNLABELLED), 2, seed=0)


def test_fold_split_frames_and_missing_rows():
    t = table(20, 4)
    folds = make_folds(t, 2, seed=0)
    train, val = fold_split(t, folds, 0)
    for part in (train, val):
        assert list(part.columns) == list(t.columns) and part.index.equals(pd.RangeIndex(len(part)))
    with pytest.raises(ValueError, match=r"^rows without a fold \(first: \['13', '14', '15', '16', '17'\]\); rerun the folds step$"):
        fold_split(t, folds.iloc[:13], 0)                              # ids 13..19 have no fold
