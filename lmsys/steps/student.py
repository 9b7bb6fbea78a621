"""Steps 4.5, 5, 6, 7: the student.

  calibrate  (model)  step 4.5: vector (or temperature) scaling of a teacher's logits, cross-fitted by
                      fold: fold k's logits scaled by parameters fitted on the other folds' validation rows
  distill    (fold)   step 5: the student on fold k's training rows, loss = CE + per teacher KL + cosine
  ensemble            step 6: the fold adapters combined (mean | exact | weighted) into one merged model
  quantize            step 7: GPTQ 8-bit of the merged model (optional, quantize.enabled)
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys.data.schema import LOGIT_COLUMNS
from lmsys.io import write_json, write_table
from lmsys.metrics import class_prior, log_loss, softmax
from lmsys.paths import Layout
from lmsys.steps import StepResult
from lmsys.steps import common
from lmsys.steps.folds import active_folds
from lmsys.steps.teachers import teacher_names

# torch-backed modules (calibration, distill, ensemble, infer, train, models) are imported inside
# the step functions: listing and hashing steps must not cost the torch/peft imports.

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- step 1 for the student

def run_post_pretrain_student(cfg: dict, layout: Layout) -> StepResult:
    """Step 1 for the student: post-pretrain it on the UT data as the teachers are (same split and
    settings); step 5 starts every fold's student from this adapter."""
    from lmsys.steps.teachers import run_post_pretrain
    return run_post_pretrain(cfg, layout, cfg["models"]["student"])


# ---------------------------------------------------------------- step 4.5

def student_logits_path(cfg: dict, layout: Layout, model: str, fold: int) -> Path:
    """The teacher logits the student sees: calibrated when step 4.5 is on, raw otherwise."""
    return layout.calibrated_logits(model, fold) if cfg["calibrate"]["enabled"] else layout.logits(model, fold)


def run_calibrate(cfg: dict, layout: Layout, model: str) -> StepResult:
    """Step 4.5, cross-fitted by fold: fold k's logits (the training rows student k learns from, and
    fold k's validation rows) are scaled by parameters fitted on the out-of-fold logits of the other
    folds only, so no student's targets depend on its own fold's validation labels, and every
    calibrated validation figure is held out. A row and its A/B swap share a fold, so they are always
    on the same side. With one active fold there is nothing to fit on: the identity, flagged."""
    from lmsys.calibration import apply_calibration
    folds, method = active_folds(cfg), cfg["calibrate"]["method"]
    frames = {k: pd.read_parquet(layout.logits(model, k)) for k in folds}
    oof = {k: f[f["split"] == "val"] for k, f in frames.items()}          # both orders of every row
    per_fold, before, after = {}, [], []
    for k in folds:
        params = _fit_without(oof, k, method)
        per_fold[str(k)] = params
        cal = frames[k].copy()
        cal[LOGIT_COLUMNS] = apply_calibration(frames[k][LOGIT_COLUMNS].to_numpy(), params)
        write_table(cal, layout.calibrated_logits(model, k))
        v, cv = frames[k][(frames[k]["split"] == "val") & ~frames[k]["swapped"]], cal[(cal["split"] == "val") & ~cal["swapped"]]
        before.append((softmax(v[LOGIT_COLUMNS].to_numpy()), v["label"].to_numpy()))
        after.append((softmax(cv[LOGIT_COLUMNS].to_numpy()), cv["label"].to_numpy()))
    pooled = lambda parts: log_loss(np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts]))  # noqa: E731
    metrics = {"model": model, "heldout_log_loss_before": pooled(before), "heldout_log_loss_after": pooled(after),
               "fallback_folds": [int(k) for k, p in per_fold.items() if p.get("fallback")]}
    write_json({**metrics, "method": method, "fitted_on": "logits", "cross_fitted": True, "folds": per_fold,
                "oof_rows": int(sum(len(v) for v in oof.values()))}, layout.calibration(model))
    return StepResult(outputs=[layout.calibration(model), layout.calibrated_logits(model, folds[0]).parent],
                      metrics=metrics)


def _fit_without(oof: dict[int, pd.DataFrame], k: int, method: str) -> dict:
    """Calibration params for fold k, fitted on the validation logits of every other fold (never
    fold k's labels); the identity (fallback, with the reason) when there is no other fold."""
    from lmsys.calibration import fit_or_identity, identity_params
    others = [j for j in oof if j != k]
    rows = pd.concat([oof[j] for j in others], ignore_index=True) if others else None
    if rows is None or not len(rows):
        return {**identity_params(method), "fallback": True, "fitted_on_folds": [],
                "reason": f"no out-of-fold rows without fold {k} (one active fold): identity"}
    params = fit_or_identity(rows[LOGIT_COLUMNS].to_numpy(), rows["label"].to_numpy(), method)
    if params.get("reason"):
        log.warning("calibrate fold %d: %s", k, params["reason"])
    return {**params, "fitted_on_folds": others}


# ---------------------------------------------------------------- step 5

def soft_targets(cfg: dict, layout: Layout, fold: int, rows: pd.DataFrame) -> np.ndarray:
    """[N, n_teachers, 3] teacher logits joined to `rows` by (id, swapped)."""
    out = []
    for m in teacher_names(cfg):
        t = pd.read_parquet(student_logits_path(cfg, layout, m, fold))
        t = t[t["split"] == "train"].set_index(["id", "swapped"])[LOGIT_COLUMNS]
        key = pd.MultiIndex.from_arrays([rows["id"], rows["swapped"]])
        missing = ~key.isin(t.index)
        if missing.any():
            raise ValueError(f"fold {fold}: {missing.sum()} training rows have no logits from teacher {m} "
                             f"(teacher_logits.subset limits them?); first id {rows['id'][missing].iloc[0]}")
        out.append(t.loc[key].to_numpy())
    return np.stack(out, axis=1).astype(np.float32)


def sample_weights(cfg: dict, soft: np.ndarray, labels: np.ndarray):
    """RLP-style information-gain weights of the training rows, from the teachers' mean logits
    soft [N, n_teachers, 3] and labels [N]: fixed weights [N] (mean 1) against the class prior, a
    lmsys.distill.EmaInfoGainWeights (recomputed as the student trains) against an EMA of the
    student, or None when distill.info_gain_weights is off. Raises ValueError on another baseline."""
    from lmsys.distill import EmaInfoGainWeights, info_gain_weights, prior_probs
    d = cfg["distill"]
    if not d["info_gain_weights"]:
        return None
    teacher, prior = soft.mean(axis=1), prior_probs(labels)        # [N, 3], [3]
    if d["info_gain_baseline"] == "prior":
        return info_gain_weights(teacher, labels, prior, d["info_gain_tau"]).astype(np.float32)
    if d["info_gain_baseline"] == "ema":
        return EmaInfoGainWeights(teacher, labels, prior, decay=d["info_gain_ema_decay"], tau=d["info_gain_tau"])
    raise ValueError(f"distill.info_gain_baseline must be 'prior' or 'ema', got {d['info_gain_baseline']!r}")


def run_distill(cfg: dict, layout: Layout, fold: int) -> StepResult:
    """Step 5: distil the teachers into the student on fold `fold`, starting from the student's
    post-pretrained adapter; best checkpoint by validation log loss; also writes the student's
    out-of-fold probabilities (oof.parquet, both orders)."""
    d = cfg["distill"]
    train = common.filtered_train(cfg, layout, fold)
    _, val = common.fold_tables(layout, fold)
    soft = soft_targets(cfg, layout, fold, train)
    weights = sample_weights(cfg, soft, common.labels(train))
    name = cfg["models"]["student"]
    loss = partial(_loss, T=d["temperature"], ce=d["ce_weight"], kl=d["kl_weight"], cos=d["cos_weight"])
    metrics = common.fit(cfg, layout, model=name, out=layout.student(fold), section="distill", train=train, val=val,
                         init_adapter=common.adapter(layout.post_pretrain(name)), seed=cfg["seed"] + fold,
                         desc=f"student fold{fold}", soft_targets=soft, sample_weight=weights, loss_fn=loss,
                         before_publish=lambda net, tok, work: _write_oof(cfg, net, tok, val, work / "oof.parquet"))
    return StepResult(outputs=[layout.student(fold)], metrics={
        "fold": fold, "best_val_log_loss": metrics["best_val_log_loss"], "val_accuracy": metrics["val_accuracy"],
        "steps": metrics["steps"], "sample_weights": _weight_summary(cfg, weights)})


def _weight_summary(cfg: dict, weights) -> dict | None:
    """min / mean / max of the information-gain weights over the training rows (at the end of
    training for the ema baseline), or None when they are off."""
    if weights is None:
        return None
    w = weights if isinstance(weights, np.ndarray) else weights.batch(np.arange(len(weights)))
    return {"baseline": cfg["distill"]["info_gain_baseline"], "min": float(w.min()), "mean": float(w.mean()),
            "max": float(w.max())}


def _loss(logits, labels, soft, weight, T, ce, kl, cos):
    from lmsys.distill import distill_loss
    return distill_loss(logits, labels, [soft[:, t] for t in range(soft.shape[1])], T=T,
                        ce_weight=ce, kl_weight=kl, cos_weight=cos, sample_weight=weight)


def _write_oof(cfg: dict, net, tok, val: pd.DataFrame, path: Path) -> None:
    """The student's out-of-fold logits, both orders, on the path lmsys.infer.route picks (`infer`)."""
    from lmsys.infer import classify, route
    L, bs = cfg["text"]["infer_max_length"], cfg["predict"]["batch_size"]
    way = route(net, cfg["infer"])
    log.info("oof: %s inference", way.describe())
    z = classify(net, common.encode(cfg, val, tok, L), tok.pad_token_id, bs, way, desc="oof")
    zs = classify(net, common.encode(cfg, val, tok, L, swap=True), tok.pad_token_id, bs, way, desc="oof swapped")
    out = pd.DataFrame({"id": val["id"], "label": common.labels(val)})
    out[LOGIT_COLUMNS] = z
    out[[f"swapped_{c}" for c in LOGIT_COLUMNS]] = zs
    write_table(out, path)


# ---------------------------------------------------------------- step 6

def run_ensemble(cfg: dict, layout: Layout) -> StepResult:
    """Step 6: combine the fold students (ensemble.method) into one merged model, saved with its
    tokenizer so `lmsys predict` can load it alone, in the serving target's dtype (serve.cards /
    serve.dtype: lmsys.target), which serving.json records. The base is read in the training dtype and
    the merge done in float32; each tensor is cast to the served dtype once (lmsys.ensemble.merge_into)."""
    from lmsys import models, target
    from lmsys.ensemble import ensemble_adapters, fold_weights
    folds = active_folds(cfg)
    method = cfg["ensemble"]["method"]
    weights, gains = None, None
    if method == "weighted":
        gains = fold_gains(cfg, layout, folds)
        weights = fold_weights(gains["gains"], cfg["ensemble"]["tau"])
    name = cfg["models"]["student"]
    spec, tok = common.spec(cfg, name), common.tokenizer(cfg, layout, name)
    factory = lambda: models.build_base_model(spec, tok, device=common.device(), dtype=common.dtype())  # noqa: E731
    prior = class_prior(common.table(layout, "train")["label"]).tolist()     # answers unreadable test rows
    served = target.serving_target(cfg)
    ensemble_adapters(factory, [common.adapter(layout.student(k)) for k in folds], layout.ensemble, method, weights,
                      extra={"student": name, "gains": gains, "fold_ids": folds, "class_prior": prior}, tokenizer=tok,
                      dtype=target.torch_dtype(served.dtype), sidecars={target.RECORD: target.record(served)})
    return StepResult(outputs=[layout.ensemble], metrics={"method": method, "folds": folds, "dtype": served.dtype,
                                                          "weights": None if weights is None else list(map(float, weights))})


GAIN_ROWS = 512     # at most this many common rows score the fold students for the weighted ensemble


def fold_gains(cfg: dict, layout: Layout, folds: list[int]) -> dict:
    """r_k of the weighted ensemble, every fold student scored on one common row set: the UT rows
    that step 1 holds out (post_pretrain_rows; at most GAIN_ROWS), which no fold student has trained
    on, neither in its post-pretraining nor in distillation (every competition row is in some
    student's training part, so no competition row is held out from all). r_k = mean log p_k(y) -
    mean log prior(y) on those rows, the prior being their class frequencies. Caveat: UT is another
    distribution than the competition's. Returns {gains, rows, row_set}; raises ValueError when there
    are no UT rows."""
    from lmsys.distill import prior_probs
    from lmsys.ensemble import fold_gain
    from lmsys.infer import predict_logits
    from lmsys.steps.teachers import post_pretrain_rows
    _, rows = post_pretrain_rows(cfg, layout)
    rows = rows.iloc[:GAIN_ROWS]
    if not len(rows):
        raise ValueError("ensemble.method weighted scores the fold students on the UT rows step 1 holds out, "
                         "and the UT table is empty: set data.ut, or use ensemble.method mean|exact")
    y = common.labels(rows)
    gains = []
    for k in folds:
        tok, net = common.build(cfg, layout, cfg["models"]["student"], init_adapter=common.adapter(layout.student(k)),
                           trainable=False)
        z = predict_logits(net, common.encode(cfg, rows, tok, cfg["text"]["infer_max_length"]), tok.pad_token_id,
                           cfg["predict"]["batch_size"], desc=f"fold gain {k}")
        gains.append(fold_gain(softmax(z), y, prior_probs(y)))
    return {"gains": gains, "rows": len(rows), "row_set": "ut rows held out by step 1 (post_pretrain_rows)"}


# ---------------------------------------------------------------- step 7

def calibration_texts(cfg: dict, layout: Layout, n: int) -> list[str]:
    from lmsys.text import format_text
    train = common.table(layout, "train").sample(n=min(n, len(common.table(layout, "train"))), random_state=cfg["seed"])
    return [format_text(p, a, b, cfg["text"]) for p, a, b in train[["prompt", "response_a", "response_b"]].itertuples(index=False)]


def run_quantize(cfg: dict, layout: Layout) -> StepResult:
    """Step 7: GPTQ of the merged student via transformers' GPTQConfig (gptqmodel backend), in the dtype
    step 6 recorded (serving.json, carried over); saved, reloaded with the kernel chosen for this device
    (nothing compiled: lmsys.kernels), and its log-loss change against the unquantised model measured
    on training rows. Its metrics also name the kernel a fresh machine of serve.cards would load (checked
    first: a backend the target cannot load without a build fails here, before quantising)."""
    from lmsys import kernels, target
    from lmsys.quantize import quantize_gptq
    q = cfg["quantize"]
    dtype = target.read_record(layout.ensemble)["dtype"]
    backend, why = kernels.choose_here(q["backend"], dtype, common.device())
    on_target = serve_backend(cfg, dtype)
    log.info("quantize: kernel %s (%s)", backend, why)
    texts = calibration_texts(cfg, layout, q["n_calibration"])
    metrics = quantize_gptq(layout.ensemble, layout.quantized, texts, bits=q["bits"], group_size=q["group_size"],
                            model_seqlen=q["model_seqlen"], backend=backend, dtype=target.torch_dtype(dtype),
                            device=common.device(), eval_fn=partial(_eval_model, cfg, layout))
    return StepResult(outputs=[layout.quantized], metrics={**metrics, "backend_why": why, "serve_backend": on_target})


def serve_backend(cfg: dict, dtype: str) -> str | None:
    """The GPTQ kernel a fresh machine of serve.cards loads (nothing built there), None without serve.cards."""
    from lmsys import kernels, target
    tgt = target.serving_target(cfg)
    if not tgt.cards:
        return None
    return kernels.choose_backend(cfg["quantize"]["backend"], tgt.capability, dtype, marlin_built=False, cc=True,
                                  triton=True, where=f"serve.cards {tgt.cards}")[0]


def _eval_model(cfg: dict, layout: Layout, model, tok, n: int = 128) -> float:
    """Log loss of `model` on up to n competition rows (the same rows for every model compared)."""
    from lmsys.infer import predict_logits
    rows = common.table(layout, "train").sample(n=min(n, len(common.table(layout, "train"))), random_state=cfg["seed"] + 1)
    z = predict_logits(model, common.encode(cfg, rows, tok, cfg["text"]["infer_max_length"]), tok.pad_token_id,
                       cfg["predict"]["batch_size"], desc="quant-eval")
    return log_loss(softmax(z), common.labels(rows))
