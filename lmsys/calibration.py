"""Post-hoc calibration of 3-way logits (step 4.5), after Guo et al. 2017.

Supported methods:
  vector       z -> s * z + b, a scale s[c] and a bias b[c] per class (6 parameters)
  temperature  z -> z / T, one positive scalar (fitted as log T)
Both are fitted by NLL with L-BFGS (strong Wolfe line search) on held-out logits [N, 3] and labels
[N]. The fit starts at the identity; if it ends with a higher NLL than it started (or a non-finite
one), the identity is returned instead, so fitting never raises NLL on the data it was fitted on.
Fewer than MIN_FIT_ROWS rows, or one class, are not fitted at all (fit_or_identity: the identity,
flagged with the reason; `lmsys calibrate fit` exits 1, the pipeline step records it per fold).

Files: predictions CSVs carry `id` plus either the logit columns (logit_a, logit_b, logit_tie) or
the probability columns (winner_model_a, winner_model_b, winner_tie, turned into logits by log,
clipped at 1e-7), and optionally `label` (0/1/2). A params file (calibrate_fit_file) records the
kind it was fitted on (`fitted_on`: logits | probabilities); load_params checks its schema (method,
three finite scales and biases, or a finite temperature > 0) and calibrate_apply_file refuses a
predictions file of the other kind or a --method that differs from the file's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lmsys.data.schema import LOGIT_COLUMNS, UNLABELLED, WINNER_COLUMNS
from lmsys.io import write_json, write_table
from lmsys.metrics import softmax

METHODS = ("vector", "temperature")
KINDS = ("logits", "probabilities")        # what a params file was fitted on
PROB_CLIP = 1e-7


def _check(logits, labels=None):
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 3 or z.shape[0] == 0:
        raise ValueError(f"logits must be [N, 3] with N >= 1, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf")
    if labels is None:
        return z, None
    y = np.asarray(labels)
    if y.shape != (z.shape[0],) or not np.all(np.isin(y, (0, 1, 2))):
        raise ValueError(f"labels must be [{z.shape[0]}] with values 0, 1, 2")
    return z, y.astype(np.int64)


def identity_params(method: str) -> dict:
    if method == "vector":
        return {"method": "vector", "scale": [1.0, 1.0, 1.0], "bias": [0.0, 0.0, 0.0]}
    if method == "temperature":
        return {"method": "temperature", "temperature": 1.0}
    raise ValueError(f"unknown calibration method {method!r}; supported: {METHODS}")


def check_params(params, where: str = "calibration params") -> dict:
    """Return `params` when it is a usable fit_calibration dict: method in METHODS; vector: `scale`
    and `bias`, three finite numbers each; temperature: a finite `temperature` > 0. Raises
    ValueError naming `where` and what is wrong."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: not a JSON object")
    method = params.get("method")
    if method not in METHODS:
        raise ValueError(f"{where}: method {method!r} is not one of {METHODS}")
    keys = ("scale", "bias") if method == "vector" else ("temperature",)
    for key in keys:
        if key not in params:
            raise ValueError(f"{where}: {method} params need `{key}`")
        try:
            v = np.asarray(params[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: `{key}` is not numeric: {params[key]!r}") from None
        if v.shape != ((3,) if method == "vector" else ()) or not np.all(np.isfinite(v)):
            raise ValueError(f"{where}: `{key}` must be {'three finite numbers' if method == 'vector' else 'a finite number'}, "
                             f"got {params[key]!r}")
    if method == "temperature" and float(params["temperature"]) <= 0:
        raise ValueError(f"{where}: temperature must be > 0, got {params['temperature']!r}")
    return params


def load_params(path, method: str | None = None, kind: str | None = None) -> dict:
    """Read and check a params JSON written by calibrate_fit_file (check_params, plus `fitted_on`
    in KINDS). With `method` / `kind`, also require the file's method / fitted-on kind to match.
    Raises ValueError (FileNotFoundError when the file is missing) naming the file and the problem."""
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a calibration params JSON: {e.msg} at line {e.lineno}") from None
    check_params(params, str(path))
    if params.get("fitted_on") not in KINDS:
        raise ValueError(f"{path}: `fitted_on` must be one of {KINDS} (refit with `lmsys calibrate fit`), "
                         f"got {params.get('fitted_on')!r}")
    if method is not None and method != params["method"]:
        raise ValueError(f"{path}: holds {params['method']} scaling but --method {method} was asked for")
    if kind is not None and kind != params["fitted_on"]:
        raise ValueError(f"{path}: fitted on {params['fitted_on']} but the predictions file has {kind}: "
                         f"apply it to a file of the same kind")
    return params


def apply_calibration(logits, params: dict) -> np.ndarray:
    """Calibrated logits [N, 3] (float64) from logits [N, 3] and a fit_calibration dict.
    Raises ValueError on a bad shape or params that fail check_params."""
    z, _ = _check(logits)
    check_params(params)
    method = params.get("method")
    if method == "vector":
        return z * np.asarray(params["scale"], dtype=np.float64) + np.asarray(params["bias"], dtype=np.float64)
    if method == "temperature":
        return z / float(params["temperature"])
    raise ValueError(f"unknown calibration method {method!r}; supported: {METHODS}")


def fit_calibration(logits, labels, method: str = "vector", max_iter: int = 200) -> dict:
    """Fit `method` on logits [N, 3] and labels [N] (0/1/2). Returns a JSON-able dict: method,
    scale + bias (vector) or temperature, nll_before (identity), nll_after (the returned
    parameters, measured), nll_fit (the optimiser's end point, None if non-finite), n, fallback
    (True when the fit ended higher than nll_before or non-finite, and the identity was kept). Raises ValueError on bad inputs or an unknown method."""
    params = identity_params(method)
    z, y = _check(logits, labels)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    nll_before = float(F.cross_entropy(zt, yt))
    # Free parameters start at the identity: scale 1, bias 0, log T = 0.
    a = torch.zeros(3 if method == "vector" else 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    free = [a, b] if method == "vector" else [a]
    calib = (lambda: zt * (1 + a) + b) if method == "vector" else (lambda: zt / a.exp())
    opt = torch.optim.LBFGS(free, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(calib(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        nll_fit = float(F.cross_entropy(calib(), yt))
    fitted = bool(np.isfinite(nll_fit) and nll_fit <= nll_before)
    if fitted and method == "vector":
        params.update(scale=(1 + a.detach()).tolist(), bias=b.detach().tolist())
    elif fitted:
        params.update(temperature=float(a.detach().exp()))
    # nll_after is measured on the parameters returned (the identity after a fallback), nll_fit is
    # what the optimiser reached (None when non-finite), whether or not it was kept
    nll_after = float(F.cross_entropy(torch.from_numpy(apply_calibration(z, params)), yt))
    return {**params, "nll_before": nll_before, "nll_after": nll_after,
            "nll_fit": nll_fit if np.isfinite(nll_fit) else None, "n": int(len(y)), "fallback": not fitted}


# Fewer rows than this, or labels of one class only, are no basis for a fit: 6 free parameters
# (vector scaling) fitted on a handful of rows, or on one class, drive the biases to +-15 and a
# normal file's log loss from 0.78 to 9.99 (issue 22). Such a fit is refused: the identity, flagged.
MIN_FIT_ROWS = 50


def refusal(labels) -> str | None:
    """Why `labels` are no basis for a calibration fit (fewer than MIN_FIT_ROWS rows, fewer than two
    classes), or None."""
    y = np.asarray(labels)
    if len(y) < MIN_FIT_ROWS:
        return f"{len(y)} rows, fewer than the {MIN_FIT_ROWS} a fit needs"
    if len(np.unique(y)) < 2:
        return f"every label is {int(y[0])}: a fit needs at least two classes"
    return None


def fit_or_identity(logits, labels, method: str = "vector") -> dict:
    """fit_calibration, unless `refusal(labels)`: then the identity, with fallback True and the
    reason (nll_before = nll_after, nll_fit None: nothing was fitted). Raises as fit_calibration."""
    z, y = _check(logits, labels)
    why = refusal(y)
    if why is None:
        return fit_calibration(z, y, method)
    nll = float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)))
    return {**identity_params(method), "nll_before": nll, "nll_after": nll, "nll_fit": None, "n": int(len(y)),
            "fallback": True, "reason": f"not fitted: {why}; the identity is used"}


# ---------------------------------------------------------------- files

def _bad_row(path, df: pd.DataFrame, cols: list[str], reason_of) -> None:
    """Raise ValueError naming the first row (0-based data row) whose values fail `reason_of`."""
    vals = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    for i, row in enumerate(vals):
        reason = reason_of(row)
        if reason:
            raise ValueError(f"{path}: row {i} (id {df['id'].iloc[i]!r}): {reason}: {df[cols].iloc[i].tolist()}")


def _prob_reason(row) -> str | None:
    if not np.all(np.isfinite(row)):
        return "non-numeric or missing probability"
    if np.any(row < 0) or np.any(row > 1):
        return "probability outside [0, 1]"
    if abs(row.sum() - 1) > 1e-2:
        return f"probabilities sum to {row.sum():.4f}, not 1"
    return None


def _labels(path, df: pd.DataFrame) -> np.ndarray | None:
    """Label column -> [N] int, or None when absent or all UNLABELLED (-1)."""
    if "label" not in df.columns:
        return None
    y = pd.to_numeric(df["label"], errors="coerce")
    if (y == UNLABELLED).all():
        return None
    bad = ~y.isin([0, 1, 2])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: row {i} (id {df['id'].iloc[i]!r}): label {df['label'].iloc[i]!r} is not 0, 1 or 2")
    return y.to_numpy(dtype=np.int64)


def read_predictions(csv) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids [N] str, logits [N, 3] float64, labels [N] int or None) from a predictions CSV.
    Logit columns win when both sets are present. Raises ValueError when `id` or both column sets
    are incomplete (naming what is missing), or naming the first bad row and why."""
    ids, logits, labels, _ = read_predictions_kind(csv)
    return ids, logits, labels


def read_predictions_kind(csv) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """read_predictions plus the kind of columns it read: "logits" or "probabilities"."""
    try:
        df = pd.read_csv(csv, dtype={"id": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv}: empty file") from None
    if "id" not in df.columns:
        raise ValueError(f"{csv}: no `id` column (columns: {list(df.columns)})")
    if len(df) == 0:
        raise ValueError(f"{csv}: no rows")
    if all(c in df.columns for c in LOGIT_COLUMNS):
        _bad_row(csv, df, LOGIT_COLUMNS, lambda r: None if np.all(np.isfinite(r)) else "non-numeric or missing logit")
        logits, kind = df[LOGIT_COLUMNS].to_numpy(dtype=np.float64), "logits"
    elif all(c in df.columns for c in WINNER_COLUMNS):
        _bad_row(csv, df, WINNER_COLUMNS, _prob_reason)
        logits, kind = np.log(np.clip(df[WINNER_COLUMNS].to_numpy(dtype=np.float64), PROB_CLIP, 1.0)), "probabilities"
    else:
        miss_l = [c for c in LOGIT_COLUMNS if c not in df.columns]
        miss_p = [c for c in WINNER_COLUMNS if c not in df.columns]
        raise ValueError(f"{csv}: needs the logit columns (missing {miss_l}) or the probability columns (missing {miss_p})")
    return df["id"].to_numpy(), logits, _labels(csv, df), kind


def calibrate_fit_file(preds_csv, out_json, method: str = "vector") -> dict:
    """Fit on a labelled predictions CSV and write the params JSON atomically (with `fitted_on`:
    the kind of columns it was fitted on); returns the params: the identity, flagged (`fallback`,
    `reason`), when the file is no basis for a fit (fit_or_identity). Raises ValueError when the
    file has no labels (or as read_predictions / fit_calibration)."""
    _, logits, labels, kind = read_predictions_kind(preds_csv)
    if labels is None:
        raise ValueError(f"{preds_csv}: calibration needs a `label` column (0/1/2)")
    params = {**fit_or_identity(logits, labels, method), "fitted_on": kind}
    write_json(params, out_json)
    return params


def calibrate_apply_file(preds_csv, params_json, out_csv, method: str | None = None) -> Path:
    """Apply saved params (load_params: checked, same fitted-on kind as the predictions, same method
    when `method` is given) to a predictions CSV; write `id` + the probability columns (rows sum
    to 1) atomically, csv or parquet by suffix. Returns out_csv."""
    ids, logits, _, kind = read_predictions_kind(preds_csv)
    params = load_params(params_json, method=method, kind=kind)
    probs = softmax(apply_calibration(logits, params))
    out = pd.DataFrame(probs, columns=WINNER_COLUMNS)
    out.insert(0, "id", ids)
    return write_table(out, out_csv)
