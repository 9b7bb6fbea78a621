"""Data layer: every reader, every quarantine reason, the CLI's exit codes and report accounting."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pandas as pd
import pytest

from lmsys.data import schema as S
from lmsys.data.validate import UnusableFile, validate_file

GOOD = {"model_a": "m1", "model_b": "m2", "prompt": '["hi there"]', "response_a": '["hello"]',
        "response_b": '["hey"]', "winner_model_a": "1", "winner_model_b": "0", "winner_tie": "0"}


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=S.KAGGLE_TRAIN_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def broken_corpus(path):
    """One good row, then one row per failure kind; returns {row index: expected reason}."""
    rows = [
        {"id": "1", **GOOD},
        {"id": "2", **GOOD, "prompt": '["unterminated'},                                  # bad JSON
        {"id": "3", **GOOD, "response_a": '["one", "two"]'},                              # turn mismatch
        {"id": "4", **GOOD, "winner_model_b": "1"},                                       # two winners
        {"id": "", **GOOD},                                                               # missing id
        {"id": "1", **GOOD},                                                              # duplicate id
        {"id": "7", **GOOD, "response_b": '[""]'},                                        # empty response
        {"id": "8", **GOOD, "response_a": json.dumps(["x" * 1_000_000])},                 # 1 MB response
        {"id": "9", **GOOD, "prompt": "[]", "response_a": "[]", "response_b": "[]"},      # empty conversation
        {"id": "10", **GOOD, "winner_tie": "yes"},                                        # bad label value
        {"id": "x11", **GOOD},                                                            # non-integer id
        {"id": "12", **GOOD, "prompt": '["a", null]', "response_a": '["b", "c"]', "response_b": '["d", "e"]'},  # null kept
    ]
    write_csv(path, rows)
    # a row with non-UTF-8 bytes, appended raw
    with open(path, "ab") as f:
        f.write(b'13,m1,m2,"[""caf\xe9 latin-1""]","[""a""]","[""b""]",1,0,0\n')
    return {1: "bad_json", 2: "turn_mismatch", 3: "winner_count", 4: "missing_id", 5: "duplicate_id",
            6: "empty_response", 7: "too_long", 8: "empty_conversation", 9: "bad_label", 10: "bad_id",
            12: "bad_utf8"}


def test_broken_corpus_each_reason(tmp_path):
    expected = broken_corpus(tmp_path / "bad.csv")
    v = validate_file(tmp_path / "bad.csv")
    got = dict(zip(v.quarantine["row"], v.quarantine["reason"]))
    assert got == expected
    assert sorted(v.clean["id"]) == ["1", "12"]
    null_row = v.clean.set_index("id").loc["12"]
    assert null_row["prompt"] == ["a", ""] and v.warnings["null_turn"] == 1
    rep = v.report()
    assert rep["rows_in"] == 13 == rep["rows_clean"] + rep["rows_quarantined"]
    assert sum(rep["reasons"].values()) == rep["rows_quarantined"]


def lmsys(*args):
    return subprocess.run([sys.executable, "-m", "lmsys.cli", *args], capture_output=True, text=True)


def test_cli_exit_codes_and_report(tmp_path):
    broken_corpus(tmp_path / "bad.csv")
    r = lmsys("validate", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert "turn_mismatch: 1 (first rows: 2)" in r.stdout
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["rows_in"] == rep["rows_clean"] + rep["rows_quarantined"] == 13
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert len(q) == rep["rows_quarantined"] and {"reason", "prompt", "id"} <= set(q.columns)
    assert len(pd.read_parquet(tmp_path / "out" / "clean.parquet")) == rep["rows_clean"]

    write_csv(tmp_path / "good.csv", [{"id": "1", **GOOD}])
    assert lmsys("validate", str(tmp_path / "good.csv")).returncode == 0

    (tmp_path / "cols.csv").write_text("id,prompt\n1,[]\n")
    r = lmsys("validate", str(tmp_path / "cols.csv"))
    assert r.returncode == 2 and "missing columns" in r.stderr
    r = lmsys("validate", str(tmp_path / "nope.csv"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_shared_vicuna_validates(shared_data):
    r = lmsys("validate", str(shared_data("vicuna80_human.csv")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1760 clean, 0 quarantined" in r.stdout


def arena_row(qid, winner="model_a", a="yes", b="no"):
    return {"question_id": qid, "model_a": "x", "model_b": "y", "winner": winner, "judge": "j",
            "conversation_a": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": a}],
            "conversation_b": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": b}],
            "turn": 1, "anony": True, "language": "English", "tstamp": 1.0}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_arena33k_formats(tmp_path, suffix):
    rows = [arena_row("a1"), arena_row("a2", "tie (bothbad)"), arena_row("a3", "model_b"),
            arena_row("a4", "nobody"), {**arena_row("a5"), "conversation_b": [{"role": "user", "content": "other"},
                                                                               {"role": "assistant", "content": "z"}]}]
    p = tmp_path / f"ext{suffix}"
    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(p)
    elif suffix == ".jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        p.write_text(json.dumps(rows))
    v = validate_file(p)
    assert v.fmt == "arena33k"
    assert v.clean["label"].tolist() == [0, 2, 1]
    assert v.clean.iloc[0]["prompt"] == ["q?"] and v.clean.iloc[0]["response_b"] == ["no"]
    assert dict(zip(v.quarantine["row"], v.quarantine["reason"])) == {3: "bad_label", 4: "prompt_mismatch"}


def test_ultrafeedback_parquet_and_test_csv(tmp_path):
    pd.DataFrame([{"id": 5, **GOOD}]).to_parquet(tmp_path / "ut.parquet")
    v = validate_file(tmp_path / "ut.parquet", fmt="ultrafeedback", source="ultrafeedback")
    assert v.clean.iloc[0]["source"] == "ultrafeedback" and v.clean.iloc[0]["label"] == 0
    pd.DataFrame([{"id": 9, "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'}]).to_csv(tmp_path / "test.csv", index=False)
    v = validate_file(tmp_path / "test.csv")
    assert v.clean.iloc[0]["label"] == S.UNLABELLED and len(v.quarantine) == 0


def test_unusable_files(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(UnusableFile, match="cannot read"):
        validate_file(tmp_path / "x.parquet")
    (tmp_path / "w.csv").write_text("id,prompt,response_a,response_b,winner_model_a\n")
    with pytest.raises(UnusableFile, match="not all of"):
        validate_file(tmp_path / "w.csv")


def test_demo_data_passes_validate(demo_dir):
    """Every file of the embedded demo competition validates with exit 0 (null turns are warnings)."""
    from lmsys.data.demo import demo_paths
    paths = demo_paths(demo_dir)
    for role in ("train", "test", "external", "ut"):
        r = lmsys("validate", str(paths[role]))
        assert r.returncode == 0, f"{role}: {r.stdout}{r.stderr}"
    warned = lmsys("validate", str(paths["train"])).stdout
    assert "warning null_turn" in warned
    truth = json.loads(paths["truth"].read_text())
    assert truth["train"]["bayes_log_loss"] < truth["train"]["prior_log_loss"] - 0.1
