"""Evaluation: the competition metric (multiclass log loss), accuracy, calibration error,
plots (PNG, matplotlib Agg, written atomically) and a markdown report.

Label order everywhere: 0 = A wins, 1 = B wins, 2 = tie; probabilities are [N, 3] in that order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure   # the object API: no pyplot global state, Agg canvas by default

from lmsys.data.schema import LABELS, WINNER_COLUMNS
from lmsys.io import atomic_path

EPS = 1e-15   # the Kaggle metric's clip


# ---------------------------------------------------------------- checks

def _check(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """probs [N, 3] float, labels [N] int in 0..2; raises ValueError otherwise."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"probs must be [N, 3], got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must be [{p.shape[0]}], got shape {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("no rows")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    if not np.all(np.isin(y, (0, 1, 2))):
        raise ValueError(f"labels must be 0, 1 or 2; got {sorted(set(np.unique(y).tolist()) - {0, 1, 2})}")
    return p, y.astype(np.int64)


# ---------------------------------------------------------------- metrics

def softmax(logits) -> np.ndarray:
    """Row-wise softmax of [N, K] logits (max-shifted, so large logits do not overflow)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_loss(probs, labels) -> float:
    """Mean -log p[label], probabilities clipped to [1e-15, 1 - 1e-15] (the Kaggle metric).
    Equals sklearn.metrics.log_loss(labels, probs, labels=[0, 1, 2]) for rows that sum to 1."""
    p, y = _check(probs, labels)
    picked = np.clip(p[np.arange(len(y)), y], EPS, 1 - EPS)   # [N]
    return float(-np.log(picked).mean())


def row_losses(probs, labels) -> np.ndarray:
    """Each row's log loss, -log p[label] (clipped like `log_loss`), shape [n]."""
    p, y = _check(probs, labels)
    return -np.log(np.clip(p[np.arange(len(y)), y], EPS, 1 - EPS))


def paired_bootstrap(losses_a, losses_b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of losses_a - losses_b over the same rows and its percentile bootstrap interval (rows
    resampled with replacement, `n_boot` times, fixed seed): an interval above 0 says b is better
    than a by more than the rows' noise."""
    d = np.asarray(losses_a, dtype=np.float64) - np.asarray(losses_b, dtype=np.float64)
    if d.ndim != 1 or not len(d):
        raise ValueError(f"paired_bootstrap needs two equal 1-d loss arrays, got shape {d.shape}")
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "level": level, "n": len(d)}


def accuracy(probs, labels) -> float:
    p, y = _check(probs, labels)
    return float((p.argmax(axis=1) == y).mean())


def reliability_bins(probs, labels, n_bins: int):
    """Top-label reliability bins: per equal-width confidence bin, (count, mean confidence, accuracy)."""
    p, y = _check(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = p.max(axis=1)                                  # [N]
    hit = (p.argmax(axis=1) == y).astype(np.float64)      # [N]
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)   # bins (i/n, (i+1)/n]
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_bins)
    nz = np.maximum(count, 1)
    return count, conf_sum / nz, hit_sum / nz


def ece(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error: sum over bins of |bin|/N * |accuracy - confidence|."""
    count, conf, acc = reliability_bins(probs, labels, n_bins)
    return float((count / count.sum() * np.abs(acc - conf)).sum())


def summarize(probs, labels, n_bins: int = 15) -> dict:
    """JSON-able metrics: n, log_loss, accuracy, ece, and the mean predicted probability per class."""
    p, y = _check(probs, labels)
    out = {"n": int(len(y)), "log_loss": log_loss(p, y), "accuracy": accuracy(p, y), "ece": ece(p, y, n_bins)}
    out.update({f"mean_{c}": float(m) for c, m in zip(WINNER_COLUMNS, p.mean(axis=0))})
    return out


# ---------------------------------------------------------------- labels file

def read_labels(csv) -> pd.Series:
    """Labels keyed by id (ids as text). Accepts `id` + `label` (0/1/2) or `id` + the three winner
    columns (0/1 each, exactly one 1 per row). Raises ValueError naming the missing columns or the
    first bad row (0-based data row and its reason), a duplicated id, or an empty file."""
    try:
        df = pd.read_csv(csv, dtype={"id": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv}: empty file ({Path(csv).stat().st_size} bytes): no header, no labels") from None
    if "id" not in df.columns:
        raise ValueError(f"{csv}: no `id` column (columns: {list(df.columns)})")
    if "label" in df.columns:
        y = pd.to_numeric(df["label"], errors="coerce")
        bad = ~y.isin([0, 1, 2])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{csv}: row {i}: label {df['label'].iloc[i]!r} is not 0, 1 or 2")
    elif all(c in df.columns for c in WINNER_COLUMNS):
        w = df[WINNER_COLUMNS].apply(pd.to_numeric, errors="coerce")
        bad = ~(w.isin([0, 1]).all(axis=1) & (w.sum(axis=1) == 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{csv}: row {i}: winner columns {df[WINNER_COLUMNS].iloc[i].tolist()} "
                             "must be 0/1 with exactly one 1")
        y = w.to_numpy().argmax(axis=1)
    else:
        missing = [c for c in WINNER_COLUMNS if c not in df.columns]
        raise ValueError(f"{csv}: needs `label` or the winner columns (missing {missing})")
    dup = df["id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise ValueError(f"{csv}: row {i}: duplicated id {df['id'].iloc[i]!r}")
    return pd.Series(np.asarray(y, dtype=np.int64), index=pd.Index(df["id"], name="id"), name="label")


# ---------------------------------------------------------------- plots

def _save(fig: Figure, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def plot_reliability(probs, labels, path, n_bins: int = 15) -> Path:
    """Top-label reliability diagram: accuracy vs confidence per bin, bar width ~ bin count."""
    count, conf, acc = reliability_bins(probs, labels, n_bins)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    used = count > 0
    ax.bar(centers[used], acc[used], width=1 / n_bins, alpha=0.6, edgecolor="k", label="accuracy")
    ax.plot(conf[used], acc[used], "o-", color="C3", label="(confidence, accuracy)")
    ax.set(xlabel="confidence (top label)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability, ECE={ece(probs, labels, n_bins):.4f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_fold_losses(fold_losses: dict, path) -> Path:
    """Bar chart of validation log loss per fold, with their mean as a line."""
    if not fold_losses:
        raise ValueError("no fold losses to plot")
    names = [str(k) for k in fold_losses]
    vals = np.array([float(v) for v in fold_losses.values()])
    fig = Figure(figsize=(max(4, 0.8 * len(vals) + 2), 3.5))
    ax = fig.add_subplot()
    ax.bar(names, vals, color="C0")
    ax.axhline(vals.mean(), color="C3", linestyle="--", label=f"mean {vals.mean():.4f}")
    ax.set(xlabel="fold", ylabel="log loss", title="validation log loss per fold")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(probs, labels, path) -> Path:
    """Confusion matrix of argmax predictions (rows = true label, counts and row fractions)."""
    p, y = _check(probs, labels)
    cm = np.zeros((3, 3), dtype=int)
    np.add.at(cm, (y, p.argmax(axis=1)), 1)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(4, 3.6))
    ax = fig.add_subplot()
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.2f}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black", fontsize=8)
    ax.set(xticks=range(3), yticks=range(3), xticklabels=LABELS, yticklabels=LABELS,
           xlabel="predicted", ylabel="true", title="confusion (argmax)")
    return _save(fig, path)


# ---------------------------------------------------------------- report

def rounded(obj, digits: int = 6):
    """obj with every float rounded to `digits` decimals (nested dicts/lists): the last digits of a
    log loss are float noise, and a rerun that computes the same model must write the same file."""
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), digits)
    return obj


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v)


def _table(d: dict) -> str:
    """dict of scalars -> 2-column table; dict of dicts -> one row per key, one column per inner key."""
    if all(isinstance(v, dict) for v in d.values()):
        cols = list(dict.fromkeys(k for v in d.values() for k in v))
        lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(_fmt(v.get(c, "")) for c in cols) + " |" for r, v in d.items()]
    else:
        lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in d.items()]
    return "\n".join(lines)


def _render(item, out_dir: Path) -> str:
    if isinstance(item, Path):   # an image: linked relative to the report, so the folder can move
        rel = Path(os.path.relpath(item.resolve(), out_dir.resolve())).as_posix()
        return f"![{item.stem}]({rel})"
    if isinstance(item, dict):
        return _table(item)
    if isinstance(item, (list, tuple)):
        return "\n\n".join(_render(x, out_dir) for x in item)
    if isinstance(item, str):
        return item
    raise TypeError(f"report item of type {type(item).__name__}: use str, dict, Path or a list of them")


def write_report(out_dir, sections: dict, title: str = "Evaluation report") -> Path:
    """Write out_dir/report.md atomically. sections: heading -> content, where content is a str
    (markdown, verbatim), a dict (a metrics table; dict of dicts = one row per key), a Path
    (an image, embedded with a link relative to out_dir) or a list of these. Raises TypeError otherwise."""
    out_dir = Path(out_dir)
    parts = [f"# {title}"] + [f"## {h}\n\n{_render(c, out_dir)}" for h, c in sections.items()]
    path = out_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    return path


def class_prior(labels) -> np.ndarray:
    """Class frequencies [3] of labels [N] (0/1/2), uniform when there are none: the answer for a
    test row that cannot be read."""
    y = np.asarray(labels, dtype=np.int64)
    y = y[(y >= 0) & (y <= 2)]
    return np.bincount(y, minlength=3) / len(y) if len(y) else np.full(3, 1 / 3)
