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
    assert p["fallback"] is False and p["nll_fit"] == p["nll_before"]    # no step, no loss: the fit is kept


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
    assert logits.dtype == np.float64                                   # integer logits are read as float64
    from lmsys.calibration import identity_params
    assert identity_params("temperature") == {"method": "temperature", "temperature": 1.0}
    assert identity_params("vector") == {"method": "vector", "scale": [1.0, 1.0, 1.0], "bias": [0.0, 0.0, 0.0]}
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


# ---------------------------------------------------------------- every check, with its exact message
# (mutation testing: each condition and each message on its own, one bad argument at a time)

def test_logit_and_label_checks_exact():
    from lmsys.calibration import _check
    for z, msg in [(np.zeros((4, 2)), r"^logits must be \[N, 3\] with N >= 1, got shape \(4, 2\)$"),
                   (np.zeros(3), r"^logits must be \[N, 3\] with N >= 1, got shape \(3,\)$"),
                   (np.zeros((0, 3)), r"^logits must be \[N, 3\] with N >= 1, got shape \(0, 3\)$"),
                   (np.array([[0.0, np.nan, 0.0]]), r"^logits contain NaN or inf$"),
                   (np.array([[0.0, -np.inf, 0.0]]), r"^logits contain NaN or inf$")]:
        with pytest.raises(ValueError, match=msg):
            fit_calibration(z, np.zeros(len(z), int))
        with pytest.raises(ValueError, match=msg):
            apply_calibration(z, {"method": "temperature", "temperature": 1.0})
    for y in ([0, 1, 3], [0, 1], [[0, 1, 2]], [-1, 0, 1]):
        with pytest.raises(ValueError, match=r"^labels must be \[3\] with values 0, 1, 2$"):
            fit_calibration(np.zeros((3, 3)), np.array(y))
    with pytest.raises(ValueError, match=r"^labels must be \[4\] with values 0, 1, 2$"):
        fit_calibration(np.zeros((4, 3)), np.array([0, 1, 2, 5]))
    z, y = _check(np.ones((1, 3), dtype=np.float32), np.array([2.0]))
    assert z.dtype == np.float64 and y.dtype == np.int64 and y.tolist() == [2]
    assert _check([[1, 2, 3]])[1] is None
    with pytest.raises(ValueError, match=r"^unknown calibration method 'platt'; supported: \('vector', 'temperature'\)$"):
        fit_calibration(np.zeros((3, 3)), np.zeros(3, int), "platt")


@pytest.mark.parametrize("params, msg", [
    ([1, 2], r"^P: not a JSON object$"),
    ({"method": "platt"}, r"^P: method 'platt' is not one of \('vector', 'temperature'\)$"),
    ({}, r"^P: method None is not one of \('vector', 'temperature'\)$"),
    ({"method": "vector", "bias": [0, 0, 0]}, r"^P: vector params need `scale`$"),
    ({"method": "vector", "scale": [1, 1, 1]}, r"^P: vector params need `bias`$"),
    ({"method": "temperature"}, r"^P: temperature params need `temperature`$"),
    ({"method": "vector", "scale": ["a", 1, 1], "bias": [0, 0, 0]}, r"^P: `scale` is not numeric: \['a', 1, 1\]$"),
    ({"method": "vector", "scale": [1, 1, 1], "bias": {"x": 1}}, r"^P: `bias` is not numeric: \{'x': 1\}$"),
    ({"method": "temperature", "temperature": None}, r"^P: `temperature` must be a finite number, got None$"),
    ({"method": "vector", "scale": [1, 1], "bias": [0, 0, 0]}, r"^P: `scale` must be three finite numbers, got \[1, 1\]$"),
    ({"method": "vector", "scale": [1, 1, 1], "bias": [0, 0, float("nan")]}, r"^P: `bias` must be three finite numbers, got \[0, 0, nan\]$"),
    ({"method": "vector", "scale": [[1, 1, 1]], "bias": [0, 0, 0]}, r"^P: `scale` must be three finite numbers, got \[\[1, 1, 1\]\]$"),
    ({"method": "temperature", "temperature": [2.0]}, r"^P: `temperature` must be a finite number, got \[2.0\]$"),
    ({"method": "temperature", "temperature": float("inf")}, r"^P: `temperature` must be a finite number, got inf$"),
    ({"method": "temperature", "temperature": 0.0}, r"^P: temperature must be > 0, got 0.0$"),
    ({"method": "temperature", "temperature": -2}, r"^P: temperature must be > 0, got -2$"),
])
def test_check_params_each_problem_exact(params, msg):
    from lmsys.calibration import check_params
    with pytest.raises(ValueError, match=msg):
        check_params(params, "P")
    with pytest.raises(ValueError, match=msg.replace("^P:", "^calibration params:")):
        check_params(params)
    with pytest.raises(ValueError, match=msg.replace("^P:", "^calibration params:")):
        apply_calibration(np.zeros((2, 3)), params)


def test_check_params_accepts_usable_params_and_apply_computes_them():
    from lmsys.calibration import check_params
    good = [{"method": "vector", "scale": [1, 2, 0.5], "bias": [0, -1, 2]},
            {"method": "temperature", "temperature": 1e-3}, {"method": "temperature", "temperature": 4}]
    for p in good:
        assert check_params(p) is p
    z = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    out = apply_calibration(z, good[0])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[1.0, 3.0, 3.5], [-1.0, 0.0, 4.0]])
    np.testing.assert_array_equal(apply_calibration(z, good[2]), z / 4)
    np.testing.assert_array_equal(apply_calibration(z.astype(np.float32), good[2]), z / 4)


def _params_file(tmp_path, **over):
    p = {"method": "vector", "scale": [1.0, 1.0, 1.0], "bias": [0.0, 0.0, 0.0], "fitted_on": "logits", **over}
    f = tmp_path / "c.json"
    f.write_text(json.dumps({k: v for k, v in p.items() if v is not None}))
    return f


def test_load_params_each_problem_exact(tmp_path):
    from lmsys.calibration import load_params
    f = tmp_path / "c.json"
    f.write_text('{"method": "vector",\n "scale": }')
    with pytest.raises(ValueError, match=r"c.json: not a calibration params JSON: Expecting value at line 2$"):
        load_params(f)
    f = _params_file(tmp_path, fitted_on=None)
    with pytest.raises(ValueError, match=r"c.json: `fitted_on` must be one of \('logits', 'probabilities'\) "
                                         r"\(refit with `lmsys calibrate fit`\), got None$"):
        load_params(f)
    f = _params_file(tmp_path, fitted_on="odds")
    with pytest.raises(ValueError, match=r"got 'odds'$"):
        load_params(f)
    f = _params_file(tmp_path, scale=[1, 1])
    with pytest.raises(ValueError, match=r"c.json: `scale` must be three finite numbers, got \[1, 1\]$"):
        load_params(f)
    f = _params_file(tmp_path)
    assert load_params(f)["fitted_on"] == "logits"
    assert load_params(f, method="vector", kind="logits")["scale"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"c.json: holds vector scaling but --method temperature was asked for$"):
        load_params(f, method="temperature")
    with pytest.raises(ValueError, match=r"c.json: fitted on logits but the predictions file has probabilities: "
                                         r"apply it to a file of the same kind$"):
        load_params(f, kind="probabilities")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing.json")


def test_apply_file_refuses_the_other_kind_and_method(tmp_path):
    z, y = make(200, 6)
    pd.DataFrame({"id": range(200), **dict(zip(LOGIT_COLUMNS, z.T)), "label": y}).to_csv(tmp_path / "l.csv", index=False)
    pd.DataFrame({"id": range(200), **dict(zip(WINNER_COLUMNS, softmax(z).T))}).to_csv(tmp_path / "p.csv", index=False)
    assert calibrate_fit_file(tmp_path / "l.csv", tmp_path / "v.json")["method"] == "vector"        # the default
    params = calibrate_fit_file(tmp_path / "l.csv", tmp_path / "c.json", "temperature")
    assert params["fitted_on"] == "logits" and params["method"] == "temperature"
    with pytest.raises(ValueError, match="fitted on logits but the predictions file has probabilities"):
        calibrate_apply_file(tmp_path / "p.csv", tmp_path / "c.json", tmp_path / "o.csv")
    with pytest.raises(ValueError, match="holds temperature scaling but --method vector"):
        calibrate_apply_file(tmp_path / "l.csv", tmp_path / "c.json", tmp_path / "o.csv", method="vector")
    out = calibrate_apply_file(tmp_path / "l.csv", tmp_path / "c.json", tmp_path / "o.parquet", method="temperature")
    got = pd.read_parquet(out)
    np.testing.assert_allclose(got[WINNER_COLUMNS].to_numpy(), softmax(z / params["temperature"]), rtol=1e-12)
    assert got["id"].tolist() == [str(i) for i in range(200)]


def test_fit_result_fields_exact():
    """Every field of the result, measured here: nll_before/nll_after/nll_fit from the returned
    parameters, n, fallback; the temperature fit lands on the NLL minimum (derivative ~0)."""
    import torch
    import torch.nn.functional as F
    z, y = make(400, 7)
    zb = 2.5 * z
    for method in ("vector", "temperature"):
        p = fit_calibration(zb, y, method)
        assert set(p) == ({"method", "nll_before", "nll_after", "nll_fit", "n", "fallback"}
                          | ({"scale", "bias"} if method == "vector" else {"temperature"}))
        assert p["method"] == method and p["n"] == 400 and p["fallback"] is False
        assert p["nll_before"] == pytest.approx(log_loss(softmax(zb), y), abs=1e-12)
        assert p["nll_after"] == pytest.approx(log_loss(softmax(apply_calibration(zb, p)), y), abs=1e-12)
        assert p["nll_fit"] == pytest.approx(p["nll_after"], abs=1e-9)
        assert all(isinstance(v, float) for v in (p["nll_before"], p["nll_after"], p["nll_fit"]))
    p = fit_calibration(zb, y, "temperature")
    t = torch.tensor(p["temperature"], dtype=torch.float64, requires_grad=True)
    F.cross_entropy(torch.from_numpy(zb) / t, torch.from_numpy(y)).backward()
    assert abs(float(t.grad)) < 1e-7                                  # a converged optimum, not an early stop
    assert float(np.float32(p["temperature"])) != p["temperature"]      # fitted in float64, not float32
    p = fit_calibration(zb, y, "vector")
    s = torch.tensor(p["scale"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(p["bias"], dtype=torch.float64, requires_grad=True)
    F.cross_entropy(torch.from_numpy(zb) * s + b, torch.from_numpy(y)).backward()
    assert float(s.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4
    assert all(float(np.float32(v)) != v for v in p["scale"] + p["bias"])   # fitted in float64, not float32


def test_max_iter_limits_the_optimiser():
    """max_iter=1: one L-BFGS iteration does not reach the optimum that max_iter=200 reaches."""
    z, y = make(400, 8)
    zb = 3 * z + np.array([1.0, -0.5, 0.0])
    one, full = fit_calibration(zb, y, "vector", max_iter=1), fit_calibration(zb, y, "vector")
    assert full["nll_after"] < one["nll_after"] - 1e-4 < one["nll_before"]


@pytest.mark.parametrize("frame, match", [
    ({"x": [1]}, r"f.csv: no `id` column \(columns: \['x'\]\)$"),
    ({"id": [], "logit_a": [], "logit_b": [], "logit_tie": []}, r"f.csv: no rows$"),
    ({"id": ["a"], "logit_a": [0], "logit_b": [0]},
     r"f.csv: needs the logit columns \(missing \['logit_tie'\]\) or the probability columns "
     r"\(missing \['winner_model_a', 'winner_model_b', 'winner_tie'\]\)$"),
    ({"id": ["a", "b"], "logit_a": [0, 1], "logit_b": [0, 0], "logit_tie": [0, float("inf")]},
     r"f.csv: row 1 \(id 'b'\): non-numeric or missing logit: \[1.0, 0.0, inf\]$"),
    ({"id": ["a", "b"], "winner_model_a": [0.2, None], "winner_model_b": [0.3, 0.5], "winner_tie": [0.5, 0.5]},
     r"f.csv: row 1 \(id 'b'\): non-numeric or missing probability: \[nan, 0.5, 0.5\]$"),
    ({"id": ["a", "b"], "winner_model_a": [0.2, 1.02], "winner_model_b": [0.8, -0.02], "winner_tie": [0.0, 0.0]},
     r"f.csv: row 1 \(id 'b'\): probability outside \[0, 1\]: \[1.02, -0.02, 0.0\]$"),
    ({"id": ["a", "b"], "winner_model_a": [0.2, 0.5], "winner_model_b": [0.8, -0.1], "winner_tie": [0.0, 0.6]},
     r"f.csv: row 1 \(id 'b'\): probability outside \[0, 1\]: \[0.5, -0.1, 0.6\]$"),
    ({"id": ["a", "b"], "winner_model_a": [0.2, 0.0], "winner_model_b": [0.8, 1.02], "winner_tie": [0.0, 0.0]},
     r"f.csv: row 1 \(id 'b'\): probability outside \[0, 1\]: \[0.0, 1.02, 0.0\]$"),
    ({"id": ["a", "b"], "winner_model_a": [0.2, 0.5], "winner_model_b": [0.8, 0.5], "winner_tie": [0.0, 0.02]},
     r"f.csv: row 1 \(id 'b'\): probabilities sum to 1.0200, not 1: \[0.5, 0.5, 0.02\]$"),
    ({"id": ["a", "b"], "winner_model_a": [0.2, 0.49], "winner_model_b": [0.8, 0.49], "winner_tie": [0.0, 0.0]},
     r"f.csv: row 1 \(id 'b'\): probabilities sum to 0.9800, not 1: \[0.49, 0.49, 0.0\]$"),
    ({"id": ["a", "b"], "logit_a": [0, 1], "logit_b": [0, 0], "logit_tie": [0, 0], "label": [0, "x"]},
     r"f.csv: row 1 \(id 'b'\): label 'x' is not 0, 1 or 2$"),
    ({"id": ["a", "b"], "logit_a": [0, 1], "logit_b": [0, 0], "logit_tie": [0, 0], "label": [-1, 1]},
     r"f.csv: row 0 \(id 'a'\): label (np.int64\()?-1\)? is not 0, 1 or 2$"),
])
def test_read_predictions_each_problem_exact(tmp_path, frame, match):
    pd.DataFrame(frame).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(ValueError, match=match):
        read_predictions(tmp_path / "f.csv")


def test_read_predictions_kinds_probability_floor_and_labels(tmp_path):
    from lmsys.calibration import read_predictions_kind
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty.csv: empty file$"):
        read_predictions(tmp_path / "empty.csv")
    both = pd.DataFrame({"id": ["1", "2"], "logit_a": [1.0, 2.0], "logit_b": [0.0, 0.0], "logit_tie": [0.0, 1.0],
                         "winner_model_a": [0.2, 0.3], "winner_model_b": [0.3, 0.3], "winner_tie": [0.5, 0.4],
                         "label": [-1, -1]})
    both.to_csv(tmp_path / "both.csv", index=False)
    ids, logits, labels, kind = read_predictions_kind(tmp_path / "both.csv")
    assert kind == "logits" and labels is None and logits.dtype == np.float64       # logits win; all -1: unlabelled
    np.testing.assert_array_equal(logits, [[1.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    pd.DataFrame({"id": ["1", "2"], "winner_model_a": [0.0, 0.3], "winner_model_b": [1.0, 0.3], "winner_tie": [0.0, 0.4],
                  "label": [1.0, 2.0]}).to_csv(tmp_path / "p.csv", index=False)
    ids, logits, labels, kind = read_predictions_kind(tmp_path / "p.csv")
    assert kind == "probabilities" and labels.tolist() == [1, 2] and labels.dtype == np.int64
    np.testing.assert_allclose(logits, np.log([[1e-7, 1.0, 1e-7], [0.3, 0.3, 0.4]]), rtol=1e-12)   # clipped at 1e-7
    pd.DataFrame({"id": ["1", "2"], "winner_model_a": [0.0, 0.3], "winner_model_b": [1.0, 0.3], "winner_tie": [0.0, 0.4],
                  "label": [-1, 2]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"m.csv: row 0 \(id '1'\): label (np.int64\()?-1\)? is not 0, 1 or 2$"):
        read_predictions(tmp_path / "m.csv")        # -1 alongside real labels: not "unlabelled"
    pd.DataFrame({"id": ["1", "2"], "winner_model_a": [0.995, 0.3], "winner_model_b": [0.0, 0.3],
                  "winner_tie": [0.0, 0.4]}).to_csv(tmp_path / "ok.csv", index=False)
    assert read_predictions(tmp_path / "ok.csv")[1].shape == (2, 3)                  # within the 1e-2 tolerance
