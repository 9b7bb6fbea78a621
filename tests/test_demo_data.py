"""The embedded demo competition: exact schemas, determinism, and a latent model that really
generated the labels (Bayes well below the prior, recomputable from the texts)."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from lmsys.data.demo import LATENT, demo_paths, make_demo_data, true_probs
from lmsys.data.schema import (ARENA_REQUIRED, ARENA_WINNER_TO_LABEL, KAGGLE_TEST_COLUMNS,
                               KAGGLE_TRAIN_COLUMNS, WINNER_COLUMNS, text_key)

SMALL = dict(rows=60, test_rows=20, external_rows=30, ut_rows=20)
ARENA_KEYS = {"question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b",
              "turn", "anony", "language", "tstamp", "openai_moderation", "toxic_chat_tag"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default-size demo (its statistics need the full row counts); generated once."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def train(demo):
    return pd.read_csv(demo["train"])


@pytest.fixture(scope="module")
def truth(demo):
    return json.loads(demo["truth"].read_text())


def _arena(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _turns(df, col):
    return [json.loads(s) for s in df[col]]


def test_demo_paths_match_written_files(demo, tmp_path):
    assert demo == demo_paths(demo["train"].parent)
    assert set(demo) == {"train", "test", "test_labels", "external", "ut", "truth"}
    assert all(p.is_file() for p in demo.values())
    assert not any(p.name.endswith(".tmp") for p in demo["train"].parent.iterdir())


def test_deterministic_per_seed(tmp_path):
    a = make_demo_data(tmp_path / "a", seed=3, **SMALL)
    b = make_demo_data(tmp_path / "b", seed=3, **SMALL)
    c = make_demo_data(tmp_path / "c", seed=4, **SMALL)
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes(), k
    for k in ("train", "test", "external", "ut"):
        assert a[k].read_bytes() != c[k].read_bytes(), k


def test_bad_sizes_raise(tmp_path):
    with pytest.raises(ValueError):
        make_demo_data(tmp_path, rows=0)
    with pytest.raises(ValueError):
        make_demo_data(tmp_path, ut_rows=-1)


def test_exact_schemas(demo, train):
    assert list(train.columns) == KAGGLE_TRAIN_COLUMNS and len(train) == 1200
    test = pd.read_csv(demo["test"])
    assert list(test.columns) == KAGGLE_TEST_COLUMNS and len(test) == 200
    labels = pd.read_csv(demo["test_labels"])
    assert list(labels.columns) == ["id", *WINNER_COLUMNS]
    assert labels["id"].tolist() == test["id"].tolist()
    ut = pd.read_parquet(demo["ut"])
    assert list(ut.columns) == KAGGLE_TRAIN_COLUMNS and len(ut) == 400
    for df in (train, test, labels, ut):
        assert pd.api.types.is_integer_dtype(df["id"])
    assert train["id"].astype(str).str.len().between(6, 10).all()


def test_turn_lists_and_nulls(demo, train):
    test = pd.read_csv(demo["test"])
    n_null = 0
    for df in (train, test):
        p, a, b = (_turns(df, c) for c in ("prompt", "response_a", "response_b"))
        for row in zip(p, a, b):
            assert all(isinstance(x, list) and x for x in row)
            assert len(row[0]) == len(row[1]) == len(row[2])
            assert all(t is None or isinstance(t, str) for x in row for t in x)
            n_null += sum(t is None for x in row for t in x)
    assert n_null > 0
    single = np.mean([len(x) == 1 for x in _turns(train, "prompt")])
    assert 0.75 < single < 0.95
    assert max(len(x) for x in _turns(train, "prompt")) <= 4
    # json.dumps(ensure_ascii=False): unicode is stored as is, not as \u escapes
    assert train["response_a"].str.contains(r"[^\x00-\x7f]").any()
    assert not train["response_a"].str.contains(r"\\u", regex=False).any()


def test_one_winner_per_row_and_kaggle_like_shares(demo, train):
    for df in (train, pd.read_csv(demo["test_labels"]), pd.read_parquet(demo["ut"])):
        assert df[WINNER_COLUMNS].isin([0, 1]).all().all()
        assert (df[WINNER_COLUMNS].sum(axis=1) == 1).all()
    share = train[WINNER_COLUMNS].mean()
    assert 0.25 < share["winner_tie"] < 0.38
    assert share.min() > 0.25 and share.max() < 0.42


def test_ids_unique_across_sets(demo, train):
    ids = [*train["id"], *pd.read_csv(demo["test"])["id"], *pd.read_parquet(demo["ut"])["id"]]
    assert len(ids) == len(set(ids)) == 1800


def test_arena_33k_format(demo):
    recs = _arena(demo["external"])
    assert len(recs) == 300
    assert len({r["question_id"] for r in recs}) == 300
    assert {r["winner"] for r in recs} == set(ARENA_WINNER_TO_LABEL)
    for r in recs:
        assert set(r) == ARENA_KEYS and set(ARENA_REQUIRED) <= set(r)
        int(r["question_id"], 16)
        assert r["anony"] is True and r["language"] == "English" and isinstance(r["tstamp"], float)
        assert r["model_a"] != r["model_b"]
        ca, cb = r["conversation_a"], r["conversation_b"]
        assert len(ca) == len(cb) == 2 * r["turn"]
        for conv in (ca, cb):
            assert [m["role"] for m in conv] == ["user", "assistant"] * r["turn"]
            assert all(isinstance(m["content"], str) for m in conv)
        assert [m["content"] for m in ca[::2]] == [m["content"] for m in cb[::2]]


def test_external_leaks_duplicate_train_rows(demo, train, truth):
    leaks = truth["external_leaks"]
    assert len(leaks) == 3
    texts = zip(*(_turns(train, c) for c in ("prompt", "response_a", "response_b")))
    keys = {text_key(*t): i for i, t in zip(train["id"], texts)}
    by_qid = {r["question_id"]: r for r in _arena(demo["external"])}
    found = []
    for qid, r in by_qid.items():
        conv_a, conv_b = r["conversation_a"], r["conversation_b"]
        k = text_key([m["content"] for m in conv_a[::2]], [m["content"] for m in conv_a[1::2]],
                     [m["content"] for m in conv_b[1::2]])
        if k in keys:
            found.append((qid, keys[k]))
    assert sorted(found) == sorted(zip(leaks, truth["external_leak_train_ids"]))


def test_truth_log_losses(truth):
    for name, rows in (("train", 1200), ("test", 200)):
        s = truth[name]
        counts = np.array([s["class_counts"][k] for k in ("A", "B", "tie")])
        assert s["rows"] == rows == counts.sum()
        share = counts / rows
        assert s["prior_log_loss"] == pytest.approx(-(share * np.log(share)).sum(), abs=1e-9)
        assert s["uniform_log_loss"] == pytest.approx(math.log(3))
        assert s["bayes_log_loss"] < s["prior_log_loss"] - 0.05
        assert 0.6 < s["bayes_log_loss"] < 0.95
    assert truth["latent"] == LATENT


def test_labels_come_from_the_latent_model(demo, train, truth):
    """Recompute the generating probabilities from the stored texts: their log loss on the stored
    labels must be truth's Bayes figure (labels drawn from anything else would not match)."""
    test = pd.read_csv(demo["test"]).merge(pd.read_csv(demo["test_labels"]), on="id")
    for df, name in ((train, "train"), (test, "test")):
        p = np.array([true_probs(a, b) for a, b in zip(_turns(df, "response_a"), _turns(df, "response_b"))])
        y = df[WINNER_COLUMNS].to_numpy().argmax(axis=1)
        bayes = -np.log(p[np.arange(len(y)), y]).mean()
        assert bayes == pytest.approx(truth[name]["bayes_log_loss"], abs=1e-9)
        # the label tracks the model: the argmax class wins far more often than chance
        assert (p.argmax(axis=1) == y).mean() > 0.45


def test_heavy_tailed_lengths(train):
    responses = _turns(train, "response_a") + _turns(train, "response_b")
    words = [sum(len(t.split()) for t in x if t) for x in responses]
    assert max(words) > 10 * np.median(words)
    assert max(words) >= 1000 and min(words) <= 10
    prompt_words = [sum(len(t.split()) for t in x if t) for x in _turns(train, "prompt")]
    assert np.median(prompt_words) < 40 and max(prompt_words) > 200


def test_small_sizes(tmp_path):
    paths = make_demo_data(tmp_path, rows=5, test_rows=1, external_rows=2, ut_rows=0)
    assert len(pd.read_csv(paths["train"])) == 5
    ut = pd.read_parquet(paths["ut"])
    assert len(ut) == 0 and list(ut.columns) == KAGGLE_TRAIN_COLUMNS
    assert json.loads(paths["truth"].read_text())["ut"]["bayes_log_loss"] is None
    assert len(_arena(paths["external"])) == 2


def test_prepare_removes_the_leaked_external_rows_and_its_report_adds_up(demo, truth, tmp_path):
    """The prepare step on the default demo: the three external battles that repeat competition rows
    are removed with their reason (and nothing else is), and per table every row read is used,
    removed or quarantined: the report's counts add up to the rows in the files."""
    from lmsys.config import load_config
    from lmsys.paths import Layout
    from lmsys.steps.prepare import run_prepare
    cfg = load_config("tiny", {f"data.{k}": str(demo[k]) for k in ("train", "test", "external", "ut")})
    layout = Layout("tiny", tmp_path)
    run_prepare(cfg, layout)
    report = json.loads((layout.prepared / "report.json").read_text())
    removed = pd.read_csv(layout.prepared / "removed.csv", dtype={"id": str})
    leaked = removed[removed["reason"] == "in_competition_data"]
    assert sorted(leaked["id"]) == sorted(map(str, truth["external_leaks"]))
    assert set(leaked["table"]) == {"external"} and report["removed"]["external:in_competition_data"] == 3
    used = {name: pd.read_parquet(layout.prepared / f"{name}.parquet") for name in ("train", "external", "ut")}
    assert not set(leaked["id"]) & set(used["external"]["id"].astype(str))
    for name, path in (("train", demo["train"]), ("external", demo["external"]), ("ut", demo["ut"])):
        f = report["files"][str(path)]
        n_removed = sum(n for key, n in report["removed"].items() if key.startswith(f"{name}:"))
        assert f["rows_in"] == report["rows_used"][name] + n_removed + f["rows_quarantined"], name
        assert report["rows_used"][name] == len(used[name]) > 0
    assert report["files"][str(demo["external"])]["rows_in"] == len(_arena(demo["external"]))
