"""Steps 8, 8.5 and 9: inference with TTA + symmetrisation, and evaluation.

  predict   step 8/8.5: the final model (quantized if step 7 ran, else the ensemble) on the test rows in
            both A/B orders; swapped probabilities swapped back and averaged; submission.csv
  evaluate  step 9: out-of-fold and per-fold log loss / accuracy / ECE before and after calibration,
            ensembling, quantisation and TTA; DVC metrics and plots; report.md with images
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys import metrics
from lmsys.data.crosscheck import skips_predict
from lmsys.data.schema import LOGIT_COLUMNS, SUBMISSION_COLUMNS, WINNER_COLUMNS
from lmsys.io import write_json, write_table
from lmsys.paths import Layout
from lmsys.predict_workers import load_model, load_tokenizer_of
from lmsys.steps import StepResult
from lmsys.steps import common
from lmsys.steps.folds import active_folds
from lmsys.steps.student import student_logits_path
from lmsys.steps.teachers import teacher_names
from lmsys.text import encode_rows
from lmsys.tta import symmetrize

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- steps 8 / 8.5

def final_model_dir(cfg: dict, layout: Layout) -> Path:
    return layout.quantized if cfg["quantize"]["enabled"] else layout.ensemble


def load_final(model_dir: Path, device=None):
    """(tokenizer, eval model) of a merged or quantized model dir (its tokenizer is saved inside), as
    load_model loads it."""
    return load_tokenizer_of(model_dir), load_model(model_dir, device)[0]


ORDERS = ("original", "swapped")


def encode_orders(rows: pd.DataFrame, tok, text_cfg: dict, max_length: int, tta: bool) -> dict[str, list[list[int]]]:
    """Token ids of `rows` in the original A/B order, and (with TTA) in the swapped one."""
    return {o: encode_rows(rows, tok, max_length, text_cfg, swap=o == "swapped") for o in ORDERS[:1 + tta]}


def probs_of(logits: dict[str, np.ndarray], tta: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N, 3], plain original-order probabilities or None without TTA) of encode_orders' logits."""
    p = metrics.softmax(logits["original"])
    if not tta:
        return p, None
    return symmetrize(p, metrics.softmax(logits["swapped"])), p


def predict_probs(model, tok, rows: pd.DataFrame, text_cfg: dict, max_length: int, batch_size: int,
                  tta: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N, 3], probabilities of the plain original order [N, 3] or None without TTA) of a
    loaded model in this process (non-finite logits raise: lmsys.infer.predict_logits_guarded).

    With TTA the output is exactly symmetric: swapping A/B in `rows` exchanges p_A and p_B."""
    from lmsys.infer import predict_logits_guarded
    ids = encode_orders(rows, tok, text_cfg, max_length, tta)
    z = {o: predict_logits_guarded(model, v, tok.pad_token_id, batch_size, desc=f"predict {o}")[0]
         for o, v in ids.items()}
    return probs_of(z, tta)


def predict_rows(model_dir: Path, rows: pd.DataFrame, settings: dict, tta: bool
                 ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(probabilities, plain probabilities or None, info) of the model at `model_dir` on `rows`, on the
    devices of predict.devices (lmsys.predict_workers: one process per device, the same bytes as one).
    settings: the sections text, predict, serve and quantize.backend (a pipeline config or a bundle's)."""
    from lmsys import predict_workers
    tok = load_tokenizer_of(model_dir)
    ids = encode_orders(rows, tok, settings["text"], settings["text"]["infer_max_length"], tta)
    z, info = predict_workers.logits_by_order(
        model_dir, ids, tok.pad_token_id, settings["predict"]["batch_size"],
        predict_workers.devices(settings["predict"]["devices"]),
        load={"backend": settings["quantize"]["backend"], "nonfinite": settings["serve"]["nonfinite"]},
        infer=settings.get("infer"))
    return (*probs_of(z, tta), info)


def submission(ids, probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs, columns=WINNER_COLUMNS)
    out.insert(0, "id", list(ids))
    return out[SUBMISSION_COLUMNS]


def check_submission(sub: pd.DataFrame, expected_ids, where: str) -> None:
    """The final check: `sub` holds every id of `expected_ids` exactly once and no other, and every
    row is three finite probabilities summing to 1. Raises ValueError naming the ids that fail."""
    ids = sub["id"].astype(str)
    expected = set(map(str, expected_ids))
    dup = ids[ids.duplicated()].unique().tolist()
    missing = sorted(expected - set(ids))
    extra = sorted(set(ids) - expected)
    p = sub[WINNER_COLUMNS].to_numpy(dtype=np.float64)
    bad = ids[~(np.isfinite(p).all(1) & (np.abs(p.sum(1) - 1) < 1e-6) & (p >= 0).all(1))].tolist()
    problems = [f"{what} {len(v)} (first: {v[:5]})" for what, v in
                (("ids missing", missing), ("ids repeated", dup), ("ids not in the test data", extra),
                 ("rows not summing to 1", bad)) if v]
    if problems:
        raise ValueError(f"{where}: submission fails the final check: {'; '.join(problems)}")


def with_fallback(ids, probs: np.ndarray, fallback: pd.DataFrame, prior: np.ndarray) -> tuple[pd.DataFrame, pd.Series]:
    """(submission of the predicted rows plus one prior row per fallback id, reason per row: ''
    where the model answered)."""
    sub = pd.concat([submission(ids, probs),
                     submission(fallback["id"].astype(str), np.tile(prior, (len(fallback), 1)))], ignore_index=True)
    reason = pd.Series([""] * len(ids) + fallback["reason"].astype(str).tolist(), name="fallback_reason")
    return sub, reason


def run_predict(cfg: dict, layout: Layout) -> StepResult:
    """Steps 8/8.5: predict the prepared test rows with the final model; every quarantined test row
    (prepared/test_fallback.csv) gets the training class prior, flagged with its reason; the
    submission is checked against the raw test files' ids (every id once, rows sum to 1: ValueError
    otherwise). Writes submission.csv, test_probs.parquet (TTA and plain, fallback_reason) and
    last_run.json (what `lmsys predict` uses by default). The model runs in its recorded serving dtype
    on the devices of predict.devices; non-finite logits are recomputed in float32 or fail (serve.nonfinite)."""
    from lmsys.data.validate import raw_ids
    from lmsys.steps.prepare import data_files
    model_dir = final_model_dir(cfg, layout)
    test = common.table(layout, "test")
    fallback = pd.read_csv(layout.prepared / "test_fallback.csv", dtype={"id": str}, keep_default_na=False)  # "" stays ""
    p, plain, info = predict_rows(model_dir, test, cfg, cfg["predict"]["tta"])
    prior = metrics.class_prior(common.table(layout, "train")["label"])
    sub, reason = with_fallback(test["id"], p, fallback, prior)
    expected = [i for f in data_files(cfg, layout)["test"] for i in raw_ids(f)]
    check_submission(sub, expected, "predict")
    write_table(sub, layout.submission)
    probs = sub.rename(columns=dict(zip(WINNER_COLUMNS, ("p_a", "p_b", "p_tie"))))
    if plain is not None:
        probs[["plain_a", "plain_b", "plain_tie"]] = np.vstack([plain, np.tile(prior, (len(fallback), 1))])
    probs["fallback_reason"] = reason
    write_table(probs, layout.predictions / "test_probs.parquet")
    write_table(fallback, layout.predictions / "fallback.csv")
    write_json({"profile": cfg["profile"], "model": str(model_dir), "submission": str(layout.submission),
                "report": str(layout.reports / "report.md"), "tta": cfg["predict"]["tta"],
                "class_prior": prior.tolist()}, layout.last_run)
    return StepResult(outputs=[layout.predictions], metrics={
        "rows": len(sub), "model": str(model_dir), "fallback_rows": len(fallback), "inference": info["inference"],
        "fallback_reasons": {k: int(n) for k, n in fallback["reason"].value_counts().items()},
        **{k: info[k] for k in ("devices", "nonfinite_rows", "recomputed_fp32")},
        **{k: info["workers"][0][k] for k in ("dtype", "dtype_warning", "backend", "first_call_s")}})


def model_class_prior(model_dir: Path) -> np.ndarray | None:
    """The training class prior saved with a final model (ensemble.json's class_prior, also for a
    quantized dir made from it), or None."""
    for meta in (Path(model_dir) / "ensemble.json", Path(model_dir) / "quantize.json"):
        if meta.exists():
            prior = json.loads(meta.read_text()).get("class_prior")
            if prior is not None:
                return np.asarray(prior, dtype=np.float64)
    return None


def predict_file(test_csv: Path, out_csv: Path, model_dir: Path | None, cfg: dict, tta: bool = True
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`lmsys predict --test CSV` with a pipeline's model: answer_file with model_dir defaulting to the
    last pipeline run's final model of the profile, and the class prior the model dir records (else the
    last run's, else uniform). Raises FileNotFoundError without a model, and as answer_file."""
    layout = Layout.of(cfg)
    if model_dir is None:
        if not layout.last_run.exists():
            raise FileNotFoundError(f"no model given and no pipeline run of profile {cfg['profile']!r} "
                                    f"({layout.last_run} missing): run `lmsys run` or pass --model")
        model_dir = Path(json.loads(layout.last_run.read_text())["model"])
    if not Path(model_dir).is_dir():                # before any work: not a hub name to look up, a path
        raise FileNotFoundError(f"{model_dir}: no such model directory (--model names the final model's dir)")
    prior = model_class_prior(model_dir)
    if prior is None and layout.last_run.exists():
        prior = json.loads(layout.last_run.read_text()).get("class_prior")
    prior = np.full(3, 1 / 3) if prior is None else np.asarray(prior, dtype=np.float64)
    return answer_file(test_csv, out_csv, model_dir, cfg, prior, tta)


def answer_file(test_csv: Path, out_csv: Path, model_dir: Path, settings: dict, prior: np.ndarray, tta: bool = True
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a test CSV, predict the usable rows with the model at `model_dir` (predict_rows, with
    `settings`: a pipeline config or an exported bundle's), answer the quarantined ones with `prior`,
    check the submission against the file's ids (every id once, rows sum to 1) and write it.
    Returns (submission, fallback rows: id, row, reason, detail). Raises UnusableFile for an unusable
    file, ValueError when the file has no rows or the final check fails."""
    from lmsys.data.validate import fallback_rows, raw_ids, validate_file
    v = validate_file(test_csv)
    if not v.report()["rows_in"]:
        raise ValueError(f"{test_csv}: no rows")
    fallback = fallback_rows(v)
    p = np.zeros((0, 3))
    if len(v.clean):
        p, _, _ = predict_rows(model_dir, v.clean, settings, tta)
    sub, _ = with_fallback(v.clean["id"], p, fallback, prior)
    check_submission(sub, raw_ids(test_csv), str(test_csv))
    write_table(sub, out_csv)
    return sub, fallback


# ---------------------------------------------------------------- step 9

def _oof_teacher(cfg, layout, model, calibrated: bool) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k in active_folds(cfg):
        f = pd.read_parquet(student_logits_path(cfg, layout, model, k) if calibrated else layout.logits(model, k))
        v = f[(f["split"] == "val") & ~f["swapped"]]
        out[k] = (metrics.softmax(v[LOGIT_COLUMNS].to_numpy()), v["label"].to_numpy())
    return out


OOF_PROBS = ["p_a", "p_b", "p_tie"]


def student_oof(cfg, layout, tta: bool) -> pd.DataFrame:
    """The students' out-of-fold rows pooled over the active folds, in fold order: id, fold, label and
    probabilities OOF_PROBS (with `tta`: both A/B orders, swapped back and averaged)."""
    frames = []
    for k in active_folds(cfg):
        o = pd.read_parquet(layout.student(k) / "oof.parquet")
        p = metrics.softmax(o[LOGIT_COLUMNS].to_numpy())
        if tta:
            p = symmetrize(p, metrics.softmax(o[[f"swapped_{c}" for c in LOGIT_COLUMNS]].to_numpy()))
        frames.append(pd.DataFrame({"id": o["id"].astype(str), "fold": k, "label": o["label"].to_numpy(),
                                    **dict(zip(OOF_PROBS, p.T))}))
    return pd.concat(frames, ignore_index=True)


def _oof_student(cfg, layout, tta: bool) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    o = student_oof(cfg, layout, tta)
    return {k: (g[OOF_PROBS].to_numpy(), g["label"].to_numpy()) for k, g in o.groupby("fold", sort=False)}


def _pooled(per_fold: dict, bins: int) -> dict:
    p = np.concatenate([v[0] for v in per_fold.values()])
    y = np.concatenate([v[1] for v in per_fold.values()])
    return {**metrics.summarize(p, y, bins), "per_fold_log_loss": {k: metrics.log_loss(*v) for k, v in per_fold.items()}}


def known_test_labels(cfg: dict, layout: Layout) -> pd.Series | None:
    from lmsys.data.demo import demo_paths
    from lmsys.steps.prepare import uses_demo
    path = demo_paths(layout.demo_dir)["test_labels"] if uses_demo(cfg) else cfg["data"]["test_labels"]
    return metrics.read_labels(path) if path and Path(path).exists() else None


def run_evaluate(cfg: dict, layout: Layout) -> StepResult:
    """Step 9: metrics.json, plots (PNG + CSV for `dvc plots`), report.md under reports/<profile>/."""
    bins, out = cfg["evaluate"]["ece_bins"], layout.reports
    res: dict = {"teachers": {}, "student": {}}
    for m in teacher_names(cfg):
        res["teachers"][m] = {"raw": _pooled(_oof_teacher(cfg, layout, m, False), bins)}
        if cfg["calibrate"]["enabled"]:
            res["teachers"][m]["calibrated"] = _pooled(_oof_teacher(cfg, layout, m, True), bins)
    student = {"plain": _oof_student(cfg, layout, False), "tta": _oof_student(cfg, layout, True)}
    res["student"] = {k: _pooled(v, bins) for k, v in student.items()}
    predicted = layout.predictions / "test_probs.parquet"
    probs = pd.read_parquet(predicted) if not skips_predict(cfg) else pd.DataFrame({"id": [], "fallback_reason": []})
    reasons = probs["fallback_reason"] if "fallback_reason" in probs else pd.Series([], dtype=str)
    res["fallback"] = {"test_rows": len(probs), "answered_by_fallback": int((reasons != "").sum()),
                       "reasons": {k: int(n) for k, n in reasons[reasons != ""].value_counts().items()}}
    labels = known_test_labels(cfg, layout)
    if labels is not None and len(probs):
        y = labels.reindex(probs["id"].astype(str)).to_numpy()
        res["test"] = {"final_model": final_model_dir(cfg, layout).name,
                       "tta": metrics.summarize(probs[["p_a", "p_b", "p_tie"]].to_numpy(), y, bins)}
        if "plain_a" in probs:
            res["test"]["plain"] = metrics.summarize(probs[["plain_a", "plain_b", "plain_tie"]].to_numpy(), y, bins)
    q = layout.quantized / "quantize.json"
    if cfg["quantize"]["enabled"] and q.exists():
        res["quantize"] = json.loads(q.read_text())
    res["reference"] = _reference(cfg, layout, student["tta"])
    p_oof = np.concatenate([v[0] for v in student["tta"].values()])
    y_oof = np.concatenate([v[1] for v in student["tta"].values()])
    prior = metrics.class_prior(y_oof)
    res["gain_over_prior"] = metrics.paired_bootstrap(metrics.row_losses(np.tile(prior, (len(y_oof), 1)), y_oof),
                                                      metrics.row_losses(p_oof, y_oof))
    plots = {"reliability": metrics.plot_reliability(p_oof, y_oof, out / "reliability.png", bins),
             "fold_losses": metrics.plot_fold_losses(res["student"]["tta"]["per_fold_log_loss"], out / "fold_losses.png"),
             "confusion": metrics.plot_confusion(p_oof, y_oof, out / "confusion.png")}
    _dvc_plot_data(out, res, p_oof, y_oof, bins)
    write_json(metrics.rounded(_flat_metrics(res)), out / "metrics.json")
    write_json(metrics.rounded(res), out / "details.json")
    metrics.write_report(out, _report_sections(cfg, res, plots), title=f"lmsys-pipeline report: profile {cfg['profile']}")
    return StepResult(outputs=[out], metrics=metrics.rounded(_flat_metrics(res)))


def _reference(cfg: dict, layout: Layout, oof: dict) -> dict:
    """Class-prior log loss on the OOF rows, and the demo's Bayes-optimal figure when known."""
    from lmsys.data.demo import demo_paths
    y = np.concatenate([v[1] for v in oof.values()])
    ref = {"class_prior_log_loss": metrics.log_loss(np.tile(np.bincount(y, minlength=3) / len(y), (len(y), 1)), y),
           "uniform_log_loss": float(np.log(3))}
    truth = demo_paths(layout.demo_dir)["truth"]
    if cfg["data"]["train"] is None and truth.exists():
        t = json.loads(truth.read_text())
        ref.update(demo_bayes_train=t["train"]["bayes_log_loss"], demo_bayes_test=t["test"]["bayes_log_loss"])
    return ref


def _flat_metrics(res: dict) -> dict:
    flat = {"student_oof_log_loss": res["student"]["tta"]["log_loss"],
            "student_oof_log_loss_no_tta": res["student"]["plain"]["log_loss"],
            "student_oof_accuracy": res["student"]["tta"]["accuracy"],
            "student_oof_ece": res["student"]["tta"]["ece"], **res["reference"]}
    for m, r in res["teachers"].items():
        flat[f"teacher_{m}_oof_log_loss"] = r["raw"]["log_loss"]
        if "calibrated" in r:
            flat[f"teacher_{m}_oof_log_loss_calibrated"] = r["calibrated"]["log_loss"]
    for k, v in res.get("test", {}).items():
        if isinstance(v, dict):
            flat[f"test_log_loss_{k}"], flat[f"test_accuracy_{k}"] = v["log_loss"], v["accuracy"]
    flat["test_rows_answered_by_fallback"] = res["fallback"]["answered_by_fallback"]
    if "quantize" in res:
        flat["quantize_log_loss_change"] = res["quantize"].get("log_loss_change")
    return flat


def _dvc_plot_data(out: Path, res: dict, p: np.ndarray, y: np.ndarray, bins: int) -> None:
    """fold_losses.csv and reliability.csv (the bins of the reliability PNG and the ECE; empty ones left out)."""
    folds = res["student"]["tta"]["per_fold_log_loss"]
    write_table(pd.DataFrame({"fold": list(folds), "log_loss": list(folds.values())}), out / "fold_losses.csv")
    count, conf, acc = metrics.reliability_bins(p, y, bins)
    used = count > 0
    write_table(pd.DataFrame({"bin": np.flatnonzero(used), "confidence": conf[used], "accuracy": acc[used],
                              "count": count[used].astype(int)}), out / "reliability.csv")


def _report_sections(cfg: dict, res: dict, plots: dict) -> dict:
    from lmsys.revision import git_rev
    rev = git_rev()                              # the code's revision
    teacher_rows = {f"{m} ({kind})": {k: v for k, v in r.items() if k != "per_fold_log_loss"}
                    for m, t in res["teachers"].items() for kind, r in t.items()}
    student_rows = {f"student ({kind})": {k: v for k, v in r.items() if k != "per_fold_log_loss"}
                    for kind, r in res["student"].items()}
    sections = {"What this run shows": what_it_shows(cfg["profile"], res),
                "Run": f"profile `{cfg['profile']}`, folds {active_folds(cfg)}, git `{rev or 'unknown'}`",
                "Reference": res["reference"],
                "Teachers, out of fold (before/after calibration; calibrated = held out: fold k's rows scaled by "
                "parameters fitted without fold k's labels)": teacher_rows,
                "Student, out of fold (without/with TTA)": student_rows}
    sections["Test rows answered by fallback (unreadable rows: class prior)"] = res["fallback"]
    if "test" in res:
        sections["Test set (final model, without/with TTA)"] = {k: v for k, v in res["test"].items() if isinstance(v, dict)}
    if "quantize" in res:
        sections["Quantisation"] = res["quantize"]
    sections["Reliability (student OOF, TTA)"] = plots["reliability"]
    sections["Per-fold log loss (student, TTA)"] = plots["fold_losses"]
    sections["Confusion matrix (student OOF, TTA)"] = plots["confusion"]
    return sections


def what_it_shows(profile: str, res: dict) -> str:
    """The report's opening paragraph: what the profile is for, the student's out-of-fold gain over
    always answering the class prior (with its bootstrap interval), and, on the demo, how much of the
    data's best possible gain (its Bayes-optimal log loss) that is."""
    from lmsys.config import PROFILES
    ref, gain = res["reference"], res["gain_over_prior"]
    student, prior = res["student"]["tta"]["log_loss"], ref["class_prior_log_loss"]
    interval = f"bootstrap {100 * gain['level']:.0f}% interval [{gain['lo']:+.4f}, {gain['hi']:+.4f}] over {gain['n']} rows"
    verdict = ("better than the prior by more than the rows' noise" if gain["lo"] > 0 else
               "worse than the prior by more than the rows' noise" if gain["hi"] < 0 else
               "no better than the prior within the rows' noise")
    text = (f"Profile `{profile}`: {PROFILES.get(profile, 'a profile of params.yaml')}.\n\n"
            f"Out of fold, the student's log loss is {student:.4f} against {prior:.4f} for always answering the class "
            f"prior: a gain of {gain['mean']:+.4f} ({interval}), {verdict}.")
    if "demo_bayes_train" in ref:
        possible = prior - ref["demo_bayes_train"]
        text += (f" The demo data's Bayes-optimal log loss is {ref['demo_bayes_train']:.4f}: the student has "
                 f"{100 * gain['mean'] / possible:.0f}% of the {possible:.4f} a perfect model would gain over the prior.")
    return text


def label_files(cfg: dict, layout: Layout) -> list[Path]:
    """Files step 9 reads besides artifacts: the test labels and the demo's truth.json, when there are any."""
    from lmsys.data.demo import demo_paths
    from lmsys.steps.prepare import uses_demo
    if uses_demo(cfg):
        p = demo_paths(layout.demo_dir)
        return [p["test_labels"], p["truth"]]
    return [Path(cfg["data"]["test_labels"])] if cfg["data"]["test_labels"] else []


def predict_inputs(cfg: dict, layout: Layout) -> list[Path]:
    """Files step 8 reads: the prepared test rows and fallback list, the training labels (class prior),
    the raw test files (the submission's ids) and the final model."""
    from lmsys.steps.prepare import data_files
    return [layout.prepared / "test.parquet", layout.prepared / "test_fallback.csv", layout.prepared / "train.parquet",
            *data_files(cfg, layout)["test"], final_model_dir(cfg, layout)]
