"""The canonical table every format is normalised into (one place for every column name).

One row = one battle:
  id        str        unique within its source (Kaggle ids are integers, kept as their decimal text)
  source    str        "kaggle" | "arena33k" | "ultrafeedback"
  model_a   str        "" when unknown (test rows)
  model_b   str
  prompt    list[str]  one entry per turn (nulls in the raw data become "")
  response_a list[str] same number of turns as prompt
  response_b list[str]
  label     int        0 = A wins, 1 = B wins, 2 = tie, -1 = unlabelled (test)
"""
from __future__ import annotations

import hashlib
import json

import pandas as pd

# Kaggle train.csv / test.csv columns, in file order.
KAGGLE_TRAIN_COLUMNS = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
                        "winner_model_a", "winner_model_b", "winner_tie"]
KAGGLE_TEST_COLUMNS = ["id", "prompt", "response_a", "response_b"]
WINNER_COLUMNS = ["winner_model_a", "winner_model_b", "winner_tie"]   # = submission's probability columns, label order
LOGIT_COLUMNS = ["logit_a", "logit_b", "logit_tie"]
SUBMISSION_COLUMNS = ["id", *WINNER_COLUMNS]

# arena "33k" (lmsys/chatbot_arena_conversations) columns we need, and its winner values.
ARENA_REQUIRED = ["question_id", "model_a", "model_b", "winner", "conversation_a", "conversation_b"]
ARENA_WINNER_TO_LABEL = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 2}

CANONICAL_COLUMNS = ["id", "source", "model_a", "model_b", "prompt", "response_a", "response_b", "label"]
LABELS = ("A", "B", "tie")
UNLABELLED = -1
SOURCES = ("kaggle", "arena33k", "ultrafeedback")


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in CANONICAL_COLUMNS}).astype({"label": "int64"})


def text_key(prompt, response_a, response_b) -> str:
    """Content key of a battle's texts (for dedup and leak removal); order-sensitive."""
    blob = json.dumps([list(prompt), list(response_a), list(response_b)], ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def prompt_key(prompt) -> str:
    """Grouping key for folds: battles with the same prompt text share it."""
    return hashlib.sha1(json.dumps(list(prompt), ensure_ascii=False).encode("utf-8")).hexdigest()


def one_hot(label: int) -> list[int]:
    return [int(label == k) for k in range(3)]
