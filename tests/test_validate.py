"""Data layer: every reader, every quarantine reason, the CLI's exit codes and report accounting."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pandas as pd
import pytest

from lmsys.data import schema
from lmsys.data.validate import UnusableFile, validate_file

GOOD = {"model_a": "m1", "model_b": "m2", "prompt": '["hi there"]', "response_a": '["hello"]',
        "response_b": '["hey"]', "winner_model_a": "1", "winner_model_b": "0", "winner_tie": "0"}


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=schema.KAGGLE_TRAIN_COLUMNS)
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
    assert v.clean.iloc[0]["label"] == schema.UNLABELLED and len(v.quarantine) == 0


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


# ---------------------------------------------------------------- every row check: reason and detail, exactly
# (mutation testing: one problem per row, the quarantine's detail text pinned)

KAGGLE_CASES = [   # (overrides of a good row, reason, detail); ids are given by position
    ({"prompt": '["unterminated'}, "bad_json", "prompt: Unterminated string starting at at char 1"),
    ({"prompt": '{"a": 1}'}, "bad_json", "prompt: not a JSON list"),
    ({"response_b": '"text"'}, "bad_json", "response_b: not a JSON list"),
    ({"response_a": "[1]"}, "bad_json", "response_a: turn is int, not a string"),
    ({"response_a": '["\\udce9"]'}, "bad_utf8", "response_a: text is not valid UTF-8"),
    ({"response_a": json.dumps(["x" * 200_001])}, "too_long", "response_a: a turn of 200001 characters (limit 200000)"),
    ({"response_a": '["a", "b"]'}, "turn_mismatch", "turns: prompt 1, response_a 2, response_b 1"),
    ({"response_b": '["a", "b"]'}, "turn_mismatch", "turns: prompt 1, response_a 1, response_b 2"),
    ({"prompt": "[]", "response_a": "[]", "response_b": "[]"}, "empty_conversation", "no turns"),
    ({"response_a": '[" \\n"]'}, "empty_response", "response_a is empty in every turn"),
    ({"response_b": "[null]"}, "empty_response", "response_b is empty in every turn"),
    ({"prompt": '[" "]'}, "empty_conversation", "prompt is empty in every turn"),
    ({"winner_tie": "yes"}, "bad_label", "winner_tie='yes' is not 0/1"),
    ({"winner_model_a": "2"}, "bad_label", "winner_model_a='2' is not 0/1"),
    ({"winner_model_b": "1"}, "winner_count", "2 winner flags set, need exactly 1"),
    ({"winner_model_a": "0"}, "winner_count", "0 winner flags set, need exactly 1"),
    ({"id": ""}, "missing_id", "id is empty"),
    ({"id": "  "}, "missing_id", "id is empty"),
    ({"id": "x11"}, "bad_id", "id 'x11' is not an integer"),
    ({"id": "3.5"}, "bad_id", "id '3.5' is not an integer"),
    ({"id": "NA"}, "bad_id", "id 'NA' is not an integer"),
    ({"id": "1"}, "duplicate_id", "id 1 already used by row 0"),
    ({"id": "1.0"}, "duplicate_id", "id 1 already used by row 0"),
]


def test_each_kaggle_row_problem_reason_and_detail(tmp_path):
    rows = [{"id": "1", **GOOD}] + [{"id": str(100 + i), **GOOD, **over} for i, (over, _, _) in enumerate(KAGGLE_CASES)]
    write_csv(tmp_path / "k.csv", rows)
    v = validate_file(tmp_path / "k.csv")
    q = v.quarantine
    assert list(q.columns) == [*schema.KAGGLE_TRAIN_COLUMNS, "row", "reason", "detail"]
    got = list(zip(q["row"], q["reason"], q["detail"]))
    assert got == [(i + 1, reason, detail) for i, (_, reason, detail) in enumerate(KAGGLE_CASES)]
    assert v.clean["id"].tolist() == ["1"] and v.fmt == "kaggle"
    assert q.loc[q["reason"] == "bad_id", "id"].tolist() == ["x11", "3.5", "NA"]        # raw cells kept
    assert v.report() == {"format": "kaggle", "rows_in": 24, "rows_clean": 1, "rows_quarantined": 23,
                          "reasons": {"bad_id": 3, "bad_json": 4, "bad_label": 2, "bad_utf8": 1, "duplicate_id": 2,
                                      "empty_conversation": 2, "empty_response": 2, "missing_id": 2, "too_long": 1,
                                      "turn_mismatch": 2, "winner_count": 2},
                          "warnings": {"null_turn": 1}}
    assert list(v.report()["reasons"]) == sorted(v.report()["reasons"])


def test_kaggle_rows_normalised(tmp_path, caplog):
    rows = [{"id": " 007 ", **GOOD, "model_a": "NA", "model_b": ""},
            {"id": "8.0", **GOOD, "winner_model_a": "0.0", "winner_model_b": " 1.0 ", "winner_tie": "False"},
            {"id": "9", **GOOD, "winner_model_a": "False", "winner_model_b": "0", "winner_tie": "True",
             "prompt": '["a", null]', "response_a": '[null, "x"]', "response_b": '["y", "z"]'},
            {"id": "10", **GOOD, "response_a": json.dumps(["é" * 200_000])}]          # exactly the limit: kept
    write_csv(tmp_path / "k.csv", rows)
    import logging
    with caplog.at_level(logging.WARNING, logger="lmsys.data.validate"):
        v = validate_file(tmp_path / "k.csv", source="mine")
    c = v.clean
    assert list(c.columns) == schema.CANONICAL_COLUMNS and len(v.quarantine) == 0
    assert list(v.quarantine.columns) == [*schema.KAGGLE_TRAIN_COLUMNS, "row", "reason", "detail"]   # even when empty
    assert c["id"].tolist() == ["7", "8", "9", "10"] and c["label"].tolist() == [0, 1, 2, 0]
    assert c["label"].dtype == "int64" and set(c["source"]) == {"mine"}
    assert c.iloc[0][["model_a", "model_b"]].tolist() == ["NA", ""]                       # "NA" is text, not missing
    assert c.iloc[1][["model_a", "model_b"]].tolist() == ["m1", "m2"]
    assert c.iloc[2]["prompt"] == ["a", ""] and c.iloc[2]["response_a"] == ["", "x"]
    assert v.warnings == {"null_turn": 2}
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'k.csv'}: 2 null turns kept as empty strings"]
    v = validate_file(tmp_path / "k.csv")
    assert set(v.clean["source"]) == {"kaggle"}


def test_unlabelled_and_ultrafeedback_sources(tmp_path):
    pd.DataFrame([{"id": 1, "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]', "model_a": None}]).to_parquet(tmp_path / "t.parquet")
    v = validate_file(tmp_path / "t.parquet")
    assert v.clean["label"].tolist() == [schema.UNLABELLED] and v.clean.iloc[0]["model_a"] == "" and v.clean.iloc[0]["model_b"] == ""
    assert v.report()["warnings"] == {} and v.report()["reasons"] == {}
    pd.DataFrame([{"id": 5, **GOOD}]).to_parquet(tmp_path / "ut.parquet")
    assert validate_file(tmp_path / "ut.parquet", fmt="ultrafeedback").clean.iloc[0]["source"] == "ultrafeedback"
    assert validate_file(tmp_path / "ut.parquet", fmt="ultrafeedback").fmt == "ultrafeedback"
    pd.DataFrame([{"id": 5, **GOOD, "prompt": ["p"], "response_a": ["a"], "response_b": ["b"]}]).to_parquet(tmp_path / "l.parquet")
    v = validate_file(tmp_path / "l.parquet")                                           # list cells (numpy arrays)
    assert v.clean.iloc[0]["prompt"] == ["p"] and v.clean.iloc[0]["response_b"] == ["b"]


def test_all_rows_quarantined_gives_an_empty_typed_table(tmp_path):
    write_csv(tmp_path / "k.csv", [{"id": "", **GOOD}])
    v = validate_file(tmp_path / "k.csv")
    assert len(v.clean) == 0 and list(v.clean.columns) == schema.CANONICAL_COLUMNS and v.clean["label"].dtype == "int64"
    assert v.report()["rows_in"] == 1 and v.report()["reasons"] == {"missing_id": 1}


def test_bad_bytes_in_any_column_quarantine_the_row(tmp_path):
    p = tmp_path / "b.csv"
    write_csv(p, [{"id": "1", **GOOD}])
    with open(p, "ab") as f:
        f.write(b'2,m\xe91,m2,"[""a""]","[""a""]","[""b""]",1,0,0\n')
        f.write(b'3,m1,m2,"[""caf\xe9""]","[""a""]","[""b""]",1,0,0\n')
    v = validate_file(p)
    assert list(zip(v.quarantine["reason"], v.quarantine["detail"])) == [
        ("bad_utf8", "model_a: bytes are not valid UTF-8"), ("bad_utf8", "prompt: bytes are not valid UTF-8")]
    assert v.quarantine["model_a"].tolist() == ["m\\udce91", "m1"]                          # escaped, not dropped
    assert v.quarantine["prompt"].iloc[1] == '["caf\\udce9"]'


ARENA_CASES = [
    ({"conversation_a": "[{"}, "bad_json", "conversation_a: Expecting property name enclosed in double quotes"),
    ({"conversation_a": '{"role": "user"}'}, "bad_json", "conversation_a: not a list of {role, content}"),
    ({"conversation_b": '["hi"]'}, "bad_json", "conversation_b: not a list of {role, content}"),
    ({"conversation_b": '[{"role": "system", "content": "x"}]'}, "bad_json", "conversation_b: unknown role 'system'"),
    ({"conversation_a": '[{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]'}, "bad_json",
     "conversation_a: turn is int, not a string"),
    ({"conversation_b": '[{"role": "user", "content": "q"}, {"role": "assistant", "content": ["b"]}]'}, "bad_json",
     "conversation_b: turn is list, not a string"),
    ({"conversation_b": '[{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]'},
     "prompt_mismatch", "conversation_a and conversation_b have different user turns"),
    ({"winner": "nobody"}, "bad_label", "winner='nobody' not in ['model_a', 'model_b', 'tie', 'tie (bothbad)']"),
    ({"winner": ""}, "bad_label", "winner='' not in ['model_a', 'model_b', 'tie', 'tie (bothbad)']"),
    ({"conversation_a": '[{"role": "user", "content": "q"}]', "conversation_b": '[{"role": "user", "content": "q"}]'},
     "turn_mismatch", "turns: prompt 1, response_a 0, response_b 0"),
    ({"question_id": None}, "missing_id", "id is empty"),
    ({"question_id": "q1"}, "duplicate_id", "id q1 already used by row 0"),
]


def _arena(qid, **over):
    conv = lambda ans: json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": ans}])
    return {"question_id": qid, "model_a": "x", "model_b": "y", "winner": "model_b", "conversation_a": conv("a"),
            "conversation_b": conv("b"), **over}


def test_each_arena_row_problem_reason_and_detail(tmp_path):
    rows = [_arena("q1")] + [_arena(f"q{100 + i}", **over) for i, (over, _, _) in enumerate(ARENA_CASES)]
    rows.append(_arena(" q7 ", model_a=None, conversation_a=json.dumps(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}, {"role": "user", "content": "r"},
         {"role": "assistant", "content": "a"}]),
        conversation_b=json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": None},
                                   {"role": "user", "content": "r"}, {"role": "assistant", "content": "c"}]), winner="tie"))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    v = validate_file(tmp_path / "a.jsonl")
    assert v.fmt == "arena33k"
    got = list(zip(v.quarantine["row"], v.quarantine["reason"], v.quarantine["detail"]))
    assert got == [(i + 1, reason, detail) for i, (_, reason, detail) in enumerate(ARENA_CASES)]
    assert v.clean["id"].tolist() == ["q1", "q7"] and v.clean["label"].tolist() == [1, 2]
    assert set(v.clean["source"]) == {"arena33k"}
    last = v.clean.iloc[1]
    assert last["model_a"] == "" and last["model_b"] == "y" and last["prompt"] == ["q", "r"]
    assert last["response_a"] == ["", "a"] and last["response_b"] == ["", "c"]
    assert v.clean.iloc[0][["model_a", "model_b"]].tolist() == ["x", "y"]
    assert v.warnings == {"null_turn": 2}


def test_row_helpers_directly():
    from lmsys.data.validate import RowError, _conversation, _printable, _row_id, _turns
    import numpy as np
    for raw in ("\udce9", '["caf\udce9"]'):
        with pytest.raises(RowError) as e:
            _turns(raw, "prompt", {})
        assert (e.value.reason, e.value.detail, str(e.value)) == ("bad_utf8", "prompt: bytes are not valid UTF-8", "bad_utf8")
    warn = {"null_turn": 3}
    assert _turns(np.array(["a", None], dtype=object), "p", warn) == ["a", ""] and warn == {"null_turn": 4}
    warn = {}
    assert _turns(["a"], "p", warn) == ["a"] and warn == {}
    assert _conversation(np.array([{"role": "user", "content": "u"}, {"role": "assistant", "content": None}]), "c", warn) \
        == (["u"], [""]) and warn == {"null_turn": 1}
    assert _conversation([], "c", warn) == ([], [])
    assert _row_id(7, True) == "7" and _row_id(" 007 ", True) == "7" and _row_id("8.0", True) == "8"
    assert _row_id(8.0, True) == "8" and _row_id(" a b ", False) == "a b" and _row_id("3.5", False) == "3.5"
    for bad in (None, float("nan"), " "):
        with pytest.raises(RowError, match="^missing_id$"):
            _row_id(bad, False)
    from lmsys.data.validate import _name
    assert [_name(v) for v in (None, float("nan"), np.nan, 2.5, 0, "m", "")] == ["", "", "", "2.5", "0", "m", ""]
    assert RowError("r").detail == "" and RowError("r", "d").detail == "d" and RowError("r").reason == "r"
    assert _printable(np.array([1, 2])) == "[1, 2]" and _printable({"k": "é"}) == '{"k": "é"}'
    assert _printable(["x", None]) == '["x", null]' and _printable(3.5) == 3.5 and _printable(None) is None
    assert _printable("a\udce9") == "a\\udce9" and _printable({"t": pd.Timestamp(0)}) == '{"t": "1970-01-01 00:00:00"}'


def test_whole_file_errors_exact(tmp_path):
    from lmsys.data.validate import read_raw
    with pytest.raises(UnusableFile, match=r"^unknown format 'xml'; choose from \('auto', 'kaggle', 'arena33k', 'ultrafeedback'\)$"):
        validate_file(tmp_path / "x.csv", fmt="xml")
    with pytest.raises(UnusableFile, match=r"nope.csv: no such file$"):
        validate_file(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(UnusableFile, match=r"x.parquet: cannot read as .parquet: "):
        read_raw(tmp_path / "x.parquet")
    for name in ("x.json", "x.JSON.gz", "x.jsonl", "x.jsonl.gz"):
        (tmp_path / name).write_text("{not json")
        with pytest.raises(UnusableFile, match=r"cannot read as \.(json|JSON|gz|jsonl)"):
            read_raw(tmp_path / name)
    (tmp_path / "noext").write_bytes(b'a,b\n"1,2\n')
    with pytest.raises(UnusableFile, match=r"noext: cannot read as csv: "):
        read_raw(tmp_path / "noext")
    (tmp_path / "ut.csv").write_text("instruction,completions,x\n1,2,3\n")
    with pytest.raises(UnusableFile, match=r"ut.csv: the raw UltraFeedback release \(columns \['completions', 'instruction', 'x'\]\.\.\.\): "
                                           r"convert it to the competition format with `lmsys convert-ut .*ut.csv --out FILE` first$"):
        validate_file(tmp_path / "ut.csv")
    (tmp_path / "pairs.csv").write_text("chosen,rejected\n1,2\n")
    with pytest.raises(UnusableFile, match="raw UltraFeedback release"):
        validate_file(tmp_path / "pairs.csv")
    (tmp_path / "half.csv").write_text("instruction,z\n1,2\n")
    with pytest.raises(UnusableFile, match=r"half.csv: unknown format: columns \['instruction', 'z'\] match neither the Kaggle "
                                           r"schema \(\['id', 'prompt', 'response_a', 'response_b'\]\) nor the 33k schema "
                                           r"\(\['question_id', 'model_a', 'model_b', 'winner', 'conversation_a', 'conversation_b'\]\)$"):
        validate_file(tmp_path / "half.csv")
    (tmp_path / "r.csv").write_text("id,response_b\n1,[]\n")
    with pytest.raises(UnusableFile, match=r"r.csv: missing columns \['prompt', 'response_a'\] for format kaggle$"):
        validate_file(tmp_path / "r.csv")
    (tmp_path / "c.csv").write_text("conversation_b,winner\n[],tie\n")
    with pytest.raises(UnusableFile, match=r"c.csv: missing columns \['question_id', 'model_a', 'model_b', 'conversation_a'\] for format arena33k$"):
        validate_file(tmp_path / "c.csv")
    (tmp_path / "w.csv").write_text("id,prompt,response_a,response_b,winner_model_a,winner_tie\n")
    with pytest.raises(UnusableFile, match=r"w.csv: has \['winner_model_a', 'winner_tie'\] but not all of "
                                           r"\['winner_model_a', 'winner_model_b', 'winner_tie'\]$"):
        validate_file(tmp_path / "w.csv")
    write_csv(tmp_path / "k.csv", [{"id": "1", **GOOD}])
    with pytest.raises(UnusableFile, match="missing columns"):
        validate_file(tmp_path / "k.csv", fmt="arena33k")


def test_fallback_rows_and_raw_ids(tmp_path):
    from lmsys.data.validate import fallback_rows, raw_ids
    rows = [{"id": "1", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'},
            {"id": " 02 ", "prompt": "[bad", "response_a": '["a"]', "response_b": '["b"]'},       # bad_json -> "2"
            {"id": "x9 ", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'},       # bad_id -> "x9"
            {"id": "", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'},          # missing id: answered as ""
            {"id": "1", "prompt": "[bad", "response_a": '["a"]', "response_b": '["b"]'},         # a clean row's id: left out
            {"id": "2", "prompt": '["p"]', "response_a": "[]", "response_b": '["b"]'},            # "2" again: first row answers
            {"id": "3", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'},
            {"id": "3", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'}]         # duplicate_id: left out
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    v = validate_file(tmp_path / "t.csv")
    fb = fallback_rows(v)
    assert list(fb.columns) == ["id", "row", "reason", "detail"]
    assert fb.to_dict("records") == [
        {"id": "2", "row": 1, "reason": "bad_json", "detail": "prompt: Expecting value at char 1"},
        {"id": "x9", "row": 2, "reason": "bad_id", "detail": "id 'x9' is not an integer"},
        {"id": "", "row": 3, "reason": "missing_id", "detail": "id is empty"}]
    assert list(fb.index) == [0, 1, 2]
    assert raw_ids(tmp_path / "t.csv") == ["1", "2", "x9", "", "3"]
    clean = validate_file(tmp_path / "t.csv")
    clean.quarantine = clean.quarantine.iloc[:0]
    assert fallback_rows(clean).empty and list(fallback_rows(clean).columns) == ["id", "row", "reason", "detail"]
    noid = validate_file(tmp_path / "t.csv")
    noid.quarantine = noid.quarantine.drop(columns=["id"])
    assert fallback_rows(noid).empty
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _arena("q1"), _arena(" q2 ", winner="nobody"), _arena("q3", winner="x"), _arena("q2", winner="y")]))
    v = validate_file(tmp_path / "a.jsonl")
    assert fallback_rows(v)[["id", "row", "reason"]].to_dict("records") == [
        {"id": "q2", "row": 1, "reason": "bad_label"}, {"id": "q3", "row": 2, "reason": "bad_label"}]
    pd.DataFrame({"id": ["5.0", None, "6", "  ", " 7", "5"]}).to_parquet(tmp_path / "ids.parquet")
    assert raw_ids(tmp_path / "ids.parquet") == ["5", "", "6", "7"]
    pd.DataFrame({"id": [5.0, float("nan"), 6.0]}).to_parquet(tmp_path / "f.parquet")
    assert raw_ids(tmp_path / "f.parquet") == ["5", "", "6"]
    p = tmp_path / "s.csv"
    p.write_bytes(b'id,prompt\n1,x\nz\xe9,y\n')
    assert raw_ids(p) == ["1", "z\\udce9"]
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(UnusableFile, match=r"n.csv: no `id` column$"):
        raw_ids(tmp_path / "n.csv")


def test_fallback_rows_edges(tmp_path):
    """Which id column, which rows are skipped (a null id is not an answerable 'None'/'nan'), a 33k id
    kept as text, and an empty result that still has the columns."""
    from lmsys.data.validate import fallback_rows, raw_ids
    rows = [{"id": None, "question_id": "q0", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'},
            {"id": "5", "question_id": "q1", "prompt": "[bad", "response_a": '["a"]', "response_b": '["b"]'},
            {"id": "6", "question_id": "q2", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]'}]
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")       # a Kaggle file that also carries a question_id
    v = validate_file(tmp_path / "t.parquet")
    assert dict(zip(v.quarantine["row"], v.quarantine["reason"])) == {0: "missing_id", 1: "bad_json"}
    assert fallback_rows(v)[["id", "row", "reason"]].to_dict("records") == [
        {"id": "", "row": 0, "reason": "missing_id"}, {"id": "5", "row": 1, "reason": "bad_json"}]   # not 'None'/'nan'
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _arena("007", winner="nobody"), _arena(None, winner="nobody"), _arena("8")]))
    v = validate_file(tmp_path / "a.jsonl")
    assert fallback_rows(v)["id"].tolist() == ["007", ""]                                # 33k ids are text
    write_csv(tmp_path / "d.csv", [{"id": "1", **GOOD}, {"id": "1", **GOOD}])
    fb = fallback_rows(validate_file(tmp_path / "d.csv"))                               # only a repeated id
    assert fb.empty and list(fb.columns) == ["id", "row", "reason", "detail"]
    pd.DataFrame({"id": [5.0, 5.5, float("nan")]}).to_parquet(tmp_path / "f.parquet")
    assert raw_ids(tmp_path / "f.parquet") == ["5", "5.5", ""]                          # a non-integer float kept as text


def test_readers_by_suffix_keep_ids_as_text(tmp_path):
    """Compressed JSON / JSON lines are read by suffix, with the values as written (dtype=False: a
    question_id "007" stays text); a 20-digit Kaggle id is not rounded through a float."""
    import gzip
    rows = [_arena("007"), _arena("q1", winner="tie")]
    for name, text in [("a.jsonl.gz", "\n".join(json.dumps(r) for r in rows)), ("a.json.gz", json.dumps(rows)),
                       ("b.JSONL", "\n".join(json.dumps(r) for r in rows)), ("b.json", json.dumps(rows))]:
        p = tmp_path / name
        p.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
        v = validate_file(p)
        assert v.fmt == "arena33k" and v.clean["id"].tolist() == ["007", "q1"], name
        assert v.clean["label"].tolist() == [1, 2]
    for name in ("n.json", "n.jsonl"):                     # every id numeric-looking: still text
        rows = [_arena("007"), _arena("8", winner="tie")]
        (tmp_path / name).write_text(json.dumps(rows) if name == "n.json" else "\n".join(json.dumps(r) for r in rows))
        assert validate_file(tmp_path / name).clean["id"].tolist() == ["007", "8"], name
    write_csv(tmp_path / "big.csv", [{"id": "12345678901234567891", **GOOD}])
    assert validate_file(tmp_path / "big.csv").clean["id"].tolist() == ["12345678901234567891"]


@pytest.mark.parametrize("header, fmt", [("question_id,conversation_a", "arena33k"), ("id,prompt", "kaggle"),
                                         ("id,response_a", "kaggle"), ("id,response_b", "kaggle")])
def test_any_one_format_column_picks_the_format(tmp_path, header, fmt):
    """One column of a format is enough to name it; check_columns then lists the others it lacks."""
    (tmp_path / "f.csv").write_text(header + "\n1,2\n")
    with pytest.raises(UnusableFile, match=rf"f.csv: missing columns \[.*\] for format {fmt}$"):
        validate_file(tmp_path / "f.csv")


def test_exactly_the_raw_ultrafeedback_columns(tmp_path):
    (tmp_path / "u.csv").write_text("instruction,completions\n1,2\n")
    with pytest.raises(UnusableFile, match="the raw UltraFeedback release"):
        validate_file(tmp_path / "u.csv")


def test_check_columns_says_whether_labelled(tmp_path):
    from lmsys.data.validate import check_columns
    p = tmp_path / "x"
    arena = pd.DataFrame([_arena("q1")])
    assert check_columns(arena, "arena33k", p) is True                     # 33k rows always carry a winner
    assert check_columns(pd.DataFrame([{"id": "1", **GOOD}]), "kaggle", p) is True
    assert check_columns(pd.DataFrame([{"id": 1, "prompt": 1, "response_a": 1, "response_b": 1}]), "kaggle", p) is False
    (tmp_path / "u.csv").write_text("instruction,completions,c,d,e,f,g\n1,2,3,4,5,6,7\n")
    with pytest.raises(UnusableFile, match=r"\(columns \['c', 'completions', 'd', 'e', 'f', 'g'\]\.\.\.\)"):
        validate_file(tmp_path / "u.csv")                                  # the first six, sorted
