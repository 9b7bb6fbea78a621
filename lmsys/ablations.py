"""Ablations: the recipe's options judged on one run's rows, each against the recipe's default.

A variant is the default configuration with a few params.yaml keys changed (VARIANTS). Each runs
the whole pipeline in its own root (flows/ablations.py copies the default run's root first, so only
the tasks a variant changes rerun). This module scores finished roots; it runs nothing.

Scores, per variant, on exactly the rows of the default run:
  oof   the students' out-of-fold rows (every competition row once, pooled over the folds), with
        TTA when the variant's predict.tta is on (the report's student_oof_log_loss)
  test  the submission's rows when test labels exist (demo data: always), TTA per predict.tta
Each as log loss, with the paired difference to the default (variant - default: below 0 = the
variant is better) and its bootstrap 95% interval over the rows (lmsys.metrics.paired_bootstrap).
An interval that contains 0 says the rows cannot tell the two apart.

Raises FileNotFoundError when a root lacks a student's oof.parquet (the run did not finish) and
ValueError when two roots hold different rows (not runs of the same data and folds).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmsys import metrics
from lmsys.paths import Layout
from lmsys.steps.serve import OOF_PROBS, student_oof

DEFAULT = "default"
# name -> (what it changes, params.yaml overrides). The recipe's default is each key's params.yaml value.
VARIANTS: dict[str, tuple[str, dict]] = {
    "calibration-off": ("step 4.5 off: students learn from raw teacher logits", {"calibrate.enabled": False}),
    "tta-off": ("steps 8.5 and the OOF: one A/B order, no symmetrisation", {"predict.tta": False}),
    "ensemble-exact": ("step 6: mean of the merged LoRA deltas", {"ensemble.method": "exact"}),
    "ensemble-weighted": ("step 6: fold weights from group-relative advantages", {"ensemble.method": "weighted"}),
    "info-gain-on": ("step 5: information-gain sample weights", {"distill.info_gain_weights": True}),
    "post-pretrain-off": ("step 1 off: teachers and student start from the base model", {"post_pretrain.enabled": False}),
}


def test_rows(layout: Layout, labels: pd.Series | None, tta: bool) -> pd.DataFrame | None:
    """The submission's rows with their labels (None without labels or predictions)."""
    path = layout.predictions / "test_probs.parquet"
    if labels is None or not path.exists():
        return None
    t = pd.read_parquet(path)
    cols = ["p_a", "p_b", "p_tie"] if tta or "plain_a" not in t else ["plain_a", "plain_b", "plain_tie"]
    out = pd.DataFrame({"id": t["id"].astype(str), **dict(zip(OOF_PROBS, (t[c] for c in cols)))})
    out["label"] = labels.reindex(out["id"]).to_numpy()
    return out.dropna(subset=["label"]).astype({"label": int})


def losses(rows: pd.DataFrame) -> pd.Series:
    """Each row's log loss, indexed by id."""
    return pd.Series(metrics.row_losses(rows[OOF_PROBS].to_numpy(), rows["label"].to_numpy()),
                     index=rows["id"].to_numpy())


def compare(default: pd.Series, variant: pd.Series, what: str) -> dict:
    """Log loss of `variant` and its paired difference to `default` (variant - default) over the same ids."""
    if set(default.index) != set(variant.index):
        raise ValueError(f"{what}: the variant scored {len(variant)} rows, the default {len(default)}, "
                         f"{len(set(default.index) ^ set(variant.index))} ids differ")
    v = variant.reindex(default.index)
    d = metrics.paired_bootstrap(v.to_numpy(), default.to_numpy())
    return {"log_loss": float(v.mean()), "diff": d["mean"], "lo": d["lo"], "hi": d["hi"], "rows": d["n"],
            "identical": bool((v.to_numpy() == default.to_numpy()).all())}


def score(runs: dict[str, tuple[dict, Layout]], labels: pd.Series | None) -> dict:
    """{variant: {"oof": ..., "test": ... or None}} for `runs` = {name: (cfg, layout)}, DEFAULT among them."""
    rows = {}
    for name, (cfg, layout) in runs.items():
        tta = bool(cfg["predict"]["tta"])
        t = test_rows(layout, labels, tta)
        rows[name] = {"oof": losses(student_oof(cfg, layout, tta)), "test": None if t is None else losses(t)}
    base = rows[DEFAULT]
    out = {}
    for name, r in rows.items():
        out[name] = {part: (None if r[part] is None or base[part] is None
                            else compare(base[part], r[part], f"{name} {part}")) for part in ("oof", "test")}
    return out


def _cell(c: dict | None, is_default: bool) -> tuple[str, str]:
    if c is None:
        return "-", "-"
    if is_default:
        return f"{c['log_loss']:.4f}", "(reference)"
    if c["identical"]:                          # e.g. the ensemble method: the OOF rows are the fold students'
        return f"{c['log_loss']:.4f}", "same predictions"
    tell = "" if c["lo"] > 0 or c["hi"] < 0 else " ~0"
    return f"{c['log_loss']:.4f}", f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]{tell}"


def markdown(results: dict, title: str, note: str = "") -> str:
    """The ablation table: one row per variant, OOF and test log loss with the paired difference."""
    lines = [f"#### {title}", "", note, "",
             "| variant | changes | OOF log loss | OOF diff [95% CI] | test log loss | test diff [95% CI] |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        what = "params.yaml (+ the command's --set)" if name == DEFAULT else VARIANTS[name][0]
        oof, oof_d = _cell(r["oof"], name == DEFAULT)
        test, test_d = _cell(r["test"], name == DEFAULT)
        lines.append(f"| {name} | {what} | {oof} | {oof_d} | {test} | {test_d} |")
    lines += ["", "diff = variant - default over the same rows (below 0: the variant is better); "
              "~0 = the 95% bootstrap interval contains 0; same predictions = every row's probabilities are the "
              "default's (the variant changes nothing the OOF rows see)."]
    return "\n".join(lines)


def write(results: dict, out_dir: Path, title: str, note: str = "") -> Path:
    """ablations.json and ablations.md under out_dir (atomically); returns the .md path."""
    from lmsys.io import atomic_path, write_json
    write_json(results, out_dir / "ablations.json")
    md = out_dir / "ablations.md"
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(results, title, note) + "\n")
    return md
