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
