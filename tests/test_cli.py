"""The CLI wrappers over library functions: calibrate fit/apply, evaluate, config overrides."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmsys.config import ConfigError, load_config


def lmsys(*args):
    return subprocess.run([sys.executable, "-m", "lmsys.cli", *args], capture_output=True, text=True)


@pytest.fixture
def preds(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 3))
    y = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in z])
    df = pd.DataFrame(z * 3.0 + [0.5, 0.0, -0.5], columns=["logit_a", "logit_b", "logit_tie"])  # mis-scaled
    df.insert(0, "id", range(400))
    df["label"] = y
    df.to_csv(tmp_path / "preds.csv", index=False)
    df[["id", "label"]].to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def test_calibrate_fit_apply_evaluate(preds):
    r = lmsys("calibrate", "fit", "--preds", str(preds / "preds.csv"), "--out", str(preds / "p.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((preds / "p.json").read_text())
    assert p["nll_after"] < p["nll_before"] - 0.1
    r = lmsys("calibrate", "apply", "--preds", str(preds / "preds.csv"), "--params-file", str(preds / "p.json"),
              "--out", str(preds / "cal.csv"))
    assert r.returncode == 0, r.stderr
    cal = pd.read_csv(preds / "cal.csv")
    np.testing.assert_allclose(cal[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1), 1, atol=1e-6)
    before = lmsys("evaluate", "--preds", str(preds / "preds.csv"), "--labels", str(preds / "labels.csv"))
    after = lmsys("evaluate", "--preds", str(preds / "cal.csv"), "--labels", str(preds / "labels.csv"))
    ll = [float(x.stdout.split()[2]) for x in (before, after)]
    assert ll[1] < ll[0] - 0.1 and "ECE" in after.stdout


def test_evaluate_missing_labels(preds):
    pd.DataFrame({"id": [0], "label": [1]}).to_csv(preds / "few.csv", index=False)
    r = lmsys("evaluate", "--preds", str(preds / "preds.csv"), "--labels", str(preds / "few.csv"))
    assert r.returncode == 2 and "have no label" in r.stderr


def test_evaluate_reads_the_preds_files_own_labels(preds):
    own = lmsys("evaluate", "--preds", str(preds / "preds.csv"))
    given = lmsys("evaluate", "--preds", str(preds / "preds.csv"), "--labels", str(preds / "labels.csv"))
    assert own.returncode == 0 and own.stdout == given.stdout, own.stderr
    pd.read_csv(preds / "preds.csv").drop(columns="label").to_csv(preds / "unlabelled.csv", index=False)
    r = lmsys("evaluate", "--preds", str(preds / "unlabelled.csv"))
    assert r.returncode == 2 and "no `label` column: pass --labels" in r.stderr


def test_step_commands_pass_only_the_steps_own_keys():
    from lmsys.cli import build_parser, step_keys
    parse = build_parser().parse_args
    assert step_keys(parse(["predict", "--model", "some/dir"])) == {}          # --model of `lmsys predict` is no key
    assert step_keys(parse(["train-teacher", "--fold", "1", "--model", "llama"])) == {"fold": 1, "model": "llama"}
    assert step_keys(parse(["calibrate", "--model", "qwen"])) == {"model": "qwen"}


def test_config_profiles_and_overrides():
    tiny, full = load_config("tiny"), load_config("full")
    assert tiny["models"]["specs"]["gemma"]["kind"] == "tiny-gemma2"
    assert full["models"]["specs"]["llama"]["quantization"] == "nf4"
    assert full["text"]["infer_max_length"] == 2000 and full["train_teacher"]["lr"] == 1e-5   # the recipe's
    assert load_config("tiny", {"train_teacher.lr": 0.5})["train_teacher"]["lr"] == 0.5
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("tiny", {"train_teacher.lrr": 1})
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge")


# ---------------------------------------------------------------- errors a script can trust (issue 11)

KAGGLE_ROW = {"id": "1", "model_a": "m1", "model_b": "m2", "prompt": '["hi there"]', "response_a": '["hello"]',
              "response_b": '["hey"]', "winner_model_a": "1", "winner_model_b": "0", "winner_tie": "0"}


def kaggle_csv(path, n=12, extra: bytes = b""):
    rows = [{**KAGGLE_ROW, "id": str(i), "prompt": json.dumps([f"question {i % 6}"]),
             "winner_model_a": str(int(i % 3 == 0)), "winner_model_b": str(int(i % 3 == 1)),
             "winner_tie": str(int(i % 3 == 2))} for i in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)
    if extra:
        with open(path, "ab") as f:
            f.write(extra)
    return path


def run_main(capsys, *args):
    from lmsys.cli import main
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", ["output.csv", "input.csv", "tutorial.csv", "ultra.csv"])
def test_format_comes_from_the_columns_not_the_file_name(tmp_path, name):
    from lmsys.data.validate import validate_file
    v = validate_file(kaggle_csv(tmp_path / name))
    assert v.fmt == "kaggle" and set(v.clean["source"]) == {"kaggle"}


def test_bad_byte_in_model_a_is_quarantined_not_fatal(tmp_path):
    path = kaggle_csv(tmp_path / "t.csv", extra=b'99,caf\xe9,m2,"[""q""]","[""a""]","[""b""]",1,0,0\n')
    r = lmsys("validate", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bad_utf8: 1 (first rows: 12)" in r.stdout
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q["detail"].iloc[0].startswith("model_a:")
    assert len(pd.read_parquet(tmp_path / "out" / "clean.parquet")) == 12


def test_header_only_input_is_exit_1_no_rows(tmp_path, capsys):
    (tmp_path / "h.csv").write_text(",".join(KAGGLE_ROW) + "\n")
    code, _, err = run_main(capsys, "validate", str(tmp_path / "h.csv"))
    assert code == 1 and "no rows" in one_error_line(err)


def test_folds_bad_k_and_quarantined_rows(tmp_path, capsys):
    path = kaggle_csv(tmp_path / "t.csv")
    code, _, err = run_main(capsys, "folds", str(path), "--n-folds", "1", "--out", str(tmp_path))
    assert code == 2 and "n_folds must be an integer >= 2" in one_error_line(err)
    code, _, err = run_main(capsys, "folds", str(path), "--n-folds", "7", "--out", str(tmp_path))
    assert code == 2 and "6 distinct prompts cannot fill 7 folds" in one_error_line(err)
    bad = kaggle_csv(tmp_path / "q.csv", extra=b'77,m1,m2,"[""broken","[""a""]","[""b""]",1,0,0\n')
    code, out, err = run_main(capsys, "folds", str(bad), "--n-folds", "3", "--out", str(tmp_path))
    assert code == 1 and "1 of 13 rows quarantined" in err and "bad_json" in err
    assert "12 rows, 3 folds; 1 rows quarantined" in out


def test_calibrate_params_are_validated(preds, capsys):
    fit = lambda *a: run_main(capsys, "calibrate", "fit", "--preds", str(preds / "preds.csv"), *a)  # noqa: E731
    apply = lambda p, *a: run_main(capsys, "calibrate", "apply", "--preds", str(preds / "preds.csv"),  # noqa: E731
                                   "--params-file", str(p), "--out", str(preds / "cal.csv"), *a)
    assert fit("--out", str(preds / "v.json"))[0] == 0
    assert json.loads((preds / "v.json").read_text())["fitted_on"] == "logits"
    (preds / "corrupt.json").write_text('{"method": "vector", "scale": [1, 1')
    (preds / "partial.json").write_text('{"method": "vector", "scale": [1, 1, 1], "fitted_on": "logits"}')
    (preds / "t0.json").write_text('{"method": "temperature", "temperature": 0, "fitted_on": "logits"}')
    (preds / "probs.json").write_text('{"method": "temperature", "temperature": 2.0, "fitted_on": "probabilities"}')
    for params, message in (("corrupt.json", "not a calibration params JSON"), ("partial.json", "need `bias`"),
                            ("t0.json", "temperature must be > 0"), ("missing.json", "No such file"),
                            ("probs.json", "fitted on probabilities but the predictions file has logits")):
        code, _, err = apply(preds / params)
        assert code == 2 and message in one_error_line(err), (params, err)
        assert not (preds / "cal.csv").exists()
    code, _, err = apply(preds / "v.json", "--method", "temperature")
    assert code == 2 and "holds vector scaling but --method temperature" in one_error_line(err)
    code, _, err = run_main(capsys, "calibrate", "apply", "--preds", str(preds / "preds.csv"), "--out", "x.csv")
    assert code == 2 and "needs --params-file" in one_error_line(err)
    code, _, err = fit()
    assert code == 2 and "needs --out" in one_error_line(err)


def test_evaluate_refuses_duplicate_ids_and_prints_matched(preds, capsys):
    df = pd.read_csv(preds / "preds.csv")
    pd.concat([df, df.iloc[:50]]).to_csv(preds / "dup.csv", index=False)
    code, _, err = run_main(capsys, "evaluate", "--preds", str(preds / "dup.csv"), "--labels", str(preds / "labels.csv"))
    assert code == 2 and "50 ids appear more than once (first: id 0 at rows [0, 400])" in one_error_line(err)
    code, out, _ = run_main(capsys, "evaluate", "--preds", str(preds / "preds.csv"), "--labels", str(preds / "labels.csv"))
    assert code == 0 and "(n=400; matched 400/400 prediction ids, 400 labels)" in out


def test_data_add_refuses_control_characters_in_the_file_name(tmp_path, capsys):
    path = kaggle_csv(tmp_path / "my\noutput.csv")
    code, _, err = run_main(capsys, "data", "add", str(path), "--no-event", "--no-dvc")
    assert code == 2 and "control characters" in one_error_line(err)


def test_exit_codes_internal_error_and_debug(tmp_path, capsys, monkeypatch):
    """Internal errors are exit 3 with one line; --debug adds the traceback; bad input from a
    subprocess is one line without a traceback."""
    import lmsys.data.demo as demo

    def broken(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(demo, "make_demo_data", broken)
    code, _, err = run_main(capsys, "demo-data", "--out", str(tmp_path))
    assert code == 3 and "internal error (RuntimeError): disk on fire" in one_error_line(err)
    code, _, err = run_main(capsys, "demo-data", "--out", str(tmp_path), "--debug")
    assert code == 3 and "Traceback" in err
    r = lmsys("calibrate", "apply", "--preds", str(tmp_path / "none.csv"), "--params-file", "p.json", "--out", "o.csv")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = lmsys("prepare", "--profile", "full")
    assert r.returncode == 2 and "would train on the demo data" in r.stderr and "Traceback" not in r.stderr
