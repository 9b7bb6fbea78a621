"""Checks across a run's input files, which no single file's validation sees (`lmsys prepare` fails on
them, exit 2; `lmsys check`, the flow's first task, reports them before any training):

  test id in two test files      the submission would answer it twice: predict's final check would
                                 fail, after every training (issue 22: data.test naming one file twice)
  test id also a training id     the same battle in the training and the test data, or a test file
                                 given as training data (or the reverse)
  unlabelled training file       a train / external file without the winner columns (a test file
                                 given as data.train): nothing to train on
  no test file                   data.train set without data.test: the submission would be empty;
                                 name the test file(s), or `data.test: none` to run without predict

Train and external files sharing ids is not an error: prepare removes the external rows whose id a
competition row has (reason id_collision, counted in its report).
"""
from __future__ import annotations

import pandas as pd

FIRST = 5                                           # ids named per problem


def skips_predict(cfg: dict) -> bool:
    """`data.test: none`: a run without a test set (no predict step, no submission)."""
    test = cfg["data"]["test"]
    return isinstance(test, str) and test.strip().lower() == "none"


def _first(ids) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:FIRST]) + (", ..." if len(ids) > FIRST else "")


def problems(cfg: dict, ids: dict[str, list[tuple[str, list[str]]]], labelled: dict[str, list[tuple[str, bool]]]
             ) -> list[str]:
    """The problems between the files of a run, each a sentence naming the files and the first ids.
    ids: table (train, test, external, ut) -> [(file, the ids it answers or trains on)], in the
    order data.<table> lists them (a file listed twice is there twice); labelled: table -> [(file,
    whether its rows carry labels)]."""
    out = []
    if cfg["data"]["train"] is not None and not cfg["data"]["test"]:        # unset (an unreadable file is its own failure)
        out.append("data.test is not set: name the test file(s) (--set data.test=PATH), or set data.test to none "
                   "to run without a test set (no predict step, no submission)")
    for table in ("train", "external"):
        for path, has_labels in labelled.get(table, []):
            if not has_labels:
                out.append(f"data.{table}: {path} has no labels (no winner columns: a test file?); a {table} file "
                           "needs winner_model_a, winner_model_b, winner_tie")
    seen: dict[str, str] = {}
    for path, file_ids in ids.get("test", []):
        again = {i: seen[i] for i in file_ids if i in seen}
        for other in sorted(set(again.values())):
            both = [i for i, p in again.items() if p == other]
            out.append(f"data.test: {len(both)} id(s) in both {other} and {path} (first: {_first(both)}): "
                       f"the submission would answer them twice{' (the same file twice?)' if other == path else ''}")
        seen.update({i: path for i in file_ids if i not in seen})
    for table in ("train", "external"):
        for path, file_ids in ids.get(table, []):
            shared = set(file_ids) & seen.keys()
            if shared:
                tests = sorted({seen[i] for i in shared})
                out.append(f"data.{table}: {path} shares {len(shared)} id(s) with the test file(s) {', '.join(tests)} "
                           f"(first: {_first(shared)}): the same battles in training and test data?")
    return out


def file_ids(clean: pd.DataFrame, fallback: pd.DataFrame | None = None) -> list[str]:
    """The ids a validated file contributes: its clean rows', plus (a test file) those answered by the fallback."""
    ids = clean["id"].astype(str).tolist()
    return ids + ([] if fallback is None else fallback["id"].astype(str).tolist())


def has_labels(clean: pd.DataFrame) -> bool:
    """Whether a validated file's rows carry labels (an empty file counts as labelled: nothing wrong to say)."""
    return not len(clean) or bool((clean["label"] >= 0).all())
