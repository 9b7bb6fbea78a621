"""`lmsys ablate` (flows/ablations.py, lmsys/ablations.py) for real: the small pipeline
(orch_config.SMALL) as the default, then three variants in copies of its root, against the test
Prefect server. Checks that each variant reruns only what it changes, that its scores are the ones
the pipeline's own report gives for the same predictions, and that "post-pretraining off" means
the base model (an untrained adapter)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from orch_config import SMALL

VARIANTS = ["tta-off", "calibration-off", "post-pretrain-off"]


@pytest.fixture(scope="module")
def ablated(pipeline_api, tmp_path_factory):
    from flows.ablations import ablations
    root = tmp_path_factory.mktemp("ablations")
    results = ablations(profile="tiny", overrides=SMALL, root=str(root), variants=VARIANTS, runner="local")
    return root, results


def _states(root, name: str) -> dict[str, str]:
    rec = json.loads((root / name / "artifacts" / "tiny" / "flow_run.json").read_text())["records"]
    return {r["task"]: r["state"] for r in rec}


def _metrics(root, name: str) -> dict:
    return json.loads((root / name / "reports" / "tiny" / "metrics.json").read_text())


def test_each_variant_reruns_only_what_it_changes(ablated):
    root, _ = ablated
    assert set(_states(root, "default").values()) == {"Completed"}
    tta = _states(root, "tta-off")
    assert {t for t, s in tta.items() if s != "Cached"} == {"predict", "evaluate"}, tta
    cal = _states(root, "calibration-off")
    assert "calibrate-modelllama" not in cal
    assert all(s == "Cached" for t, s in cal.items() if t.startswith(("train-teacher", "teacher-logits", "post-pretrain"))), cal
    assert all(s == "Completed" for t, s in cal.items() if t.startswith(("distill", "ensemble", "predict", "evaluate"))), cal
    pp = _states(root, "post-pretrain-off")
    assert all(s == "Completed" for t, s in pp.items() if t.startswith(("post-pretrain", "train-teacher", "distill"))), pp
    assert all(s == "Cached" for t, s in pp.items() if t in ("prepare", "folds", "tokenizer")), pp


def test_scores_are_the_reports_own_figures(ablated):
    """The default's scores and tta-off's (the same students and model, one order) are the default
    report's student_oof_log_loss / _no_tta and test_log_loss_tta / _plain."""
    root, res = ablated
    m = _metrics(root, "default")
    assert res["default"]["oof"]["log_loss"] == pytest.approx(m["student_oof_log_loss"], abs=2e-6)
    assert res["default"]["test"]["log_loss"] == pytest.approx(m["test_log_loss_tta"], abs=2e-6)
    assert res["tta-off"]["oof"]["log_loss"] == pytest.approx(m["student_oof_log_loss_no_tta"], abs=2e-6)
    assert res["tta-off"]["test"]["log_loss"] == pytest.approx(m["test_log_loss_plain"], abs=2e-6)
    assert res["default"]["oof"]["diff"] == 0.0 and res["default"]["oof"]["lo"] == res["default"]["oof"]["hi"] == 0.0
    assert res["default"]["oof"]["identical"] and not res["tta-off"]["oof"]["identical"]
    for name in VARIANTS:
        for part in ("oof", "test"):
            c = res[name][part]
            assert c["lo"] <= c["diff"] <= c["hi"], (name, part, c)
            assert c["diff"] == pytest.approx(c["log_loss"] - res["default"][part]["log_loss"], abs=1e-9)
    train = pd.read_parquet(root / "default" / "artifacts" / "tiny" / "prepared" / "train.parquet")
    test = pd.read_csv(root / "default" / "artifacts" / "tiny" / "predictions" / "submission.csv")
    assert res["default"]["oof"]["rows"] == len(train) and res["default"]["test"]["rows"] == len(test)
    # calibration-off trained other students: its own report agrees with the table
    assert res["calibration-off"]["oof"]["log_loss"] == pytest.approx(
        _metrics(root, "calibration-off")["student_oof_log_loss"], abs=2e-6)
    table = (root / "ablations.md").read_text()
    for name in ["default", *VARIANTS]:
        assert f"| {name} |" in table
    assert json.loads((root / "ablations.json").read_text()) == json.loads(json.dumps(res))


def test_post_pretrain_off_publishes_the_untrained_adapter(ablated):
    from safetensors.numpy import load_file
    root, _ = ablated
    step = root / "post-pretrain-off" / "artifacts" / "tiny" / "post_pretrain" / "llama"
    assert json.loads((step / "metrics.json").read_text())["steps"] == 0
    weights = load_file(step / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(not np.any(v) for v in lora_b.values())      # B = 0: the adapter adds nothing
    trained = load_file(root / "default" / "artifacts" / "tiny" / "post_pretrain" / "llama" / "adapter" / "adapter_model.safetensors")
    assert any(np.any(v) for k, v in trained.items() if "lora_B" in k)  # the default did post-pretrain


def test_rows_must_match():
    from lmsys.ablations import compare
    a = pd.Series([0.5, 1.0], index=["x", "y"])
    with pytest.raises(ValueError, match="1 rows, the default 2"):
        compare(a, a.iloc[:1], "v oof")
    c = compare(a, pd.Series([1.0, 0.5], index=["y", "x"]), "v oof")   # paired by id, not by position
    assert c["diff"] == 0.0 and c["log_loss"] == 0.75
