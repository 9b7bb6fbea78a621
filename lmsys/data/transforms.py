"""Table transforms on the canonical table: dedup, leak removal, A/B swap.

Each remover returns (kept, removed) where `removed` carries a `reason` column, so the caller
can account for every row (kept + removed == input).
"""
from __future__ import annotations

import pandas as pd

from lmsys.data import schema


def _keys(df: pd.DataFrame, swapped: bool = False) -> pd.Series:
    a, b = ("response_b", "response_a") if swapped else ("response_a", "response_b")
    return pd.Series([schema.text_key(p, x, y) for p, x, y in zip(df["prompt"], df[a], df[b])], index=df.index)


def dedupe(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop repeated battles (same prompt, responses and label; first kept) and repeated ids."""
    key = _keys(df) + ":" + df["label"].astype(str)
    dup_text = key.duplicated(keep="first")
    dup_id = df["id"].duplicated(keep="first") & ~dup_text
    removed = pd.concat([df[dup_text].assign(reason="duplicate_battle"),
                         df[dup_id].assign(reason="duplicate_id")])
    return df[~(dup_text | dup_id)].reset_index(drop=True), removed.reset_index(drop=True)


def remove_leaks(external: pd.DataFrame, competition: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop external rows whose prompt+responses (either A/B order) also appear in the competition data."""
    comp = set(_keys(competition)) | set(_keys(competition, swapped=True))
    leak = _keys(external).isin(comp)
    return (external[~leak].reset_index(drop=True),
            external[leak].assign(reason="in_competition_data").reset_index(drop=True))


def swap_ab(df: pd.DataFrame) -> pd.DataFrame:
    """The A/B-swapped copy: responses, models and the A/B labels exchanged; tie stays tie.

    Ids are kept; a boolean `swapped` column tells the copies apart."""
    out = df.copy()
    out["response_a"], out["response_b"] = df["response_b"], df["response_a"]
    out["model_a"], out["model_b"] = df["model_b"], df["model_a"]
    out["label"] = df["label"].map({0: 1, 1: 0, 2: 2, schema.UNLABELLED: schema.UNLABELLED}).astype("int64")
    out["swapped"] = ~df["swapped"] if "swapped" in df else True
    return out


def with_swaps(df: pd.DataFrame) -> pd.DataFrame:
    """Original rows (swapped=False) followed by their swapped copies (swapped=True)."""
    orig = df.assign(swapped=False)
    return pd.concat([orig, swap_ab(orig)], ignore_index=True)
