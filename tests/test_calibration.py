"""Calibration: fits help on mis-scaled logits, do no harm on calibrated ones, files round-trip."""
import json

import numpy as np
import pandas as pd
import pytest

from lmsys.calibration import (apply_calibration, calibrate_apply_file, calibrate_fit_file,
                               fit_calibration, read_predictions)
from lmsys.data.schema import LOGIT_COLUMNS, WINNER_COLUMNS
from lmsys.metrics import log_loss, softmax


def make(n, seed):
    """True logits [n, 3] and labels sampled from their softmax: calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 3)) + np.array([0.3, 0.2, -0.4])
    p = softmax(z)
    y = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    return z, y


def heldout_ll(params, z, y):
    return log_loss(softmax(apply_calibration(z, params)), y)


@pytest.mark.parametrize("method", ["vector", "temperature"])
def test_fixes_misscaled_logits(method):
    z_tr, y_tr = make(3000, 0)
    z_te, y_te = make(3000, 1)
    bias = np.array([1.0, -0.5, 0.0]) if method == "vector" else 0.0
    bad = lambda z: 3 * z + bias
    params = fit_calibration(bad(z_tr), y_tr, method)
    before, after, oracle = log_loss(softmax(bad(z_te)), y_te), heldout_ll(params, bad(z_te), y_te), log_loss(softmax(z_te), y_te)
    assert after < before - 0.2
    assert after < oracle + 0.01
    assert params["nll_after"] < params["nll_before"] and params["n"] == 3000 and not params["fallback"]
    if method == "temperature":
        assert params["temperature"] == pytest.approx(3.0, rel=0.1)
    else:
        assert np.allclose(params["scale"], 1 / 3, atol=0.05)
    json.dumps(params)   # JSON-able


@pytest.mark.parametrize("method", ["vector", "temperature"])
def test_calibrated_logits_not_hurt(method):
    z_tr, y_tr = make(2000, 2)
    z_te, y_te = make(2000, 3)
    params = fit_calibration(z_tr, y_tr, method)
    assert params["nll_after"] <= params["nll_before"]
    assert heldout_ll(params, z_te, y_te) <= log_loss(softmax(z_te), y_te) + 0.01


def train_nll(params, z, y):
    """The NLL of `params` on (z, y), measured here (lmsys.metrics), not read from the fit."""
    return log_loss(softmax(apply_calibration(z, params)), y)


@pytest.mark.parametrize("method", ["vector", "temperature"])
def test_never_raises_train_nll(method):
    z, y = make(50, 4)
    p = fit_calibration(z, y, method)
    assert not p["fallback"]
    assert p["nll_before"] == pytest.approx(log_loss(softmax(z), y), abs=1e-12)
    assert p["nll_after"] == pytest.approx(train_nll(p, z, y), abs=1e-12) == pytest.approx(p["nll_fit"], abs=1e-12)
    assert train_nll(p, z, y) < log_loss(softmax(z), y)              # 50 rows: the fit gains a little


@pytest.mark.parametrize("method", ["vector", "temperature"])
def test_uninformative_logits_keep_the_identity(method):
    """All-zero logits, balanced labels: the identity is already optimal (gradient 0) and is kept."""
    z, y = np.zeros((6, 3)), np.array([0, 1, 2, 0, 1, 2])
    p = fit_calibration(z, y, method)
    assert p["nll_after"] == pytest.approx(np.log(3), abs=1e-12) == pytest.approx(p["nll_before"], abs=1e-12)
    assert p["temperature" if method == "temperature" else "bias"] == ([0.0] * 3 if method == "vector" else 1.0)


def test_identity_fallback_when_the_fit_diverges():
    """Confidently wrong logits of size 1e200: the vector fit overflows (non-finite NLL); the
    identity is returned, flagged, and its NLL (measured) is the one reported as nll_after."""
    z = np.array([[1e200, 0, 0], [0, 1e200, 0], [0, 0, 1e200]])
    y = np.array([1, 2, 0])
    p = fit_calibration(z, y, "vector")
    assert p["fallback"] is True and p["nll_fit"] is None
    assert (p["scale"], p["bias"]) == ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert p["nll_after"] == p["nll_before"] == pytest.approx(1e200, rel=1e-9)       # -log softmax, unclipped
    json.dumps(p, allow_nan=False)                                    # strict JSON: no NaN/inf written


def test_bad_inputs():
    with pytest.raises(ValueError):
        fit_calibration(np.zeros((4, 2)), np.zeros(4, int))
    with pytest.raises(ValueError):
        fit_calibration(np.zeros((4, 3)), np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="unknown"):
        fit_calibration(np.zeros((4, 3)), np.zeros(4, int), "platt")


@pytest.mark.parametrize("as_probs", [False, True])
def test_file_round_trip(tmp_path, as_probs):
    z, y = make(1500, 5)
    zb = 3 * z + np.array([1.0, -0.5, 0.0])
    cols, vals = (WINNER_COLUMNS, softmax(zb)) if as_probs else (LOGIT_COLUMNS, zb)
    df = pd.DataFrame(vals, columns=cols)
    df.insert(0, "id", [f"00{i}" for i in range(len(y))])   # leading zeros must survive: ids are text
    df["label"] = y
    df.to_csv(tmp_path / "p.csv", index=False)
    params = calibrate_fit_file(tmp_path / "p.csv", tmp_path / "c.json", "vector")
    assert json.loads((tmp_path / "c.json").read_text()) == params
    assert params["nll_after"] < params["nll_before"] - 0.2
    out = pd.read_csv(calibrate_apply_file(tmp_path / "p.csv", tmp_path / "c.json", tmp_path / "o.csv"), dtype={"id": str})
    assert list(out.columns) == ["id", *WINNER_COLUMNS]
    assert out["id"].tolist() == df["id"].tolist()
    assert np.allclose(out[WINNER_COLUMNS].sum(1), 1)
    ids, logits, labels = read_predictions(tmp_path / "p.csv")
    assert np.allclose(out[WINNER_COLUMNS], softmax(apply_calibration(logits, params)))
    assert log_loss(out[WINNER_COLUMNS].to_numpy(), y) < log_loss(softmax(zb), y) - 0.2


def test_read_predictions_without_labels(tmp_path):
    pd.DataFrame({"id": ["a", "b"], "logit_a": [1, 2], "logit_b": [0, 0], "logit_tie": [0, 1]}).to_csv(tmp_path / "p.csv", index=False)
    ids, logits, labels = read_predictions(tmp_path / "p.csv")
    assert labels is None and logits.shape == (2, 3) and list(ids) == ["a", "b"]
    with pytest.raises(ValueError, match="label"):
        calibrate_fit_file(tmp_path / "p.csv", tmp_path / "c.json")


@pytest.mark.parametrize("frame, match", [
    ({"id": [1, 2], "logit_a": [0, 1], "winner_model_b": [0.5, 0.5]}, r"missing \['logit_b', 'logit_tie'\].*missing \['winner_model_a', 'winner_tie'\]"),
    ({"id": [1, 2, 3], "logit_a": [0, 1, 2], "logit_b": [0, "x", 0], "logit_tie": [0, 0, 0]}, r"row 1 .*non-numeric"),
    ({"id": [1, 2, 3], "winner_model_a": [0.2, 0.3, 0.9], "winner_model_b": [0.3, 0.3, 0.9], "winner_tie": [0.5, 0.4, 0.1]}, r"row 2 .*sum"),
    ({"id": [1, 2], "winner_model_a": [0.2, 1.3], "winner_model_b": [0.3, -0.3], "winner_tie": [0.5, 0.0]}, r"row 1 .*outside"),
    ({"id": [1, 2, 3], "logit_a": [0, 1, 2], "logit_b": [0, 0, 0], "logit_tie": [0, 0, 0], "label": [0, 2, 3]}, r"row 2 .*label"),
])
def test_bad_files(tmp_path, frame, match):
    pd.DataFrame(frame).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=match):
        read_predictions(tmp_path / "bad.csv")
