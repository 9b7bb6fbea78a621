"""Steps 1, 2.5, 3, 4: the teachers.

  tokenizer       tiny profile only: a byte-level BPE trained on the run's own text
  post-pretrain   (model)       step 1: 3-class classifier on the UT data, 1 epoch, cosine+warmup
  filter-score    (model)       step 2.5: the post-pretrained filter model's probabilities on every training row, once
  filter-argmax   (fold)        step 2.5: drop fold k's training rows that model confidently gets wrong (reads the scores)
  train-teacher   (model, fold) step 3: (Q)LoRA from the post-pretrained adapter, best checkpoint, resumable
  teacher-logits  (model, fold) step 4: raw logits on the fold's training rows (both orders) and its validation rows
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lmsys import distributed
from lmsys.io import atomic_dir, write_json, write_table
from lmsys.metrics import softmax
from lmsys.paths import Layout
from lmsys.steps import StepResult
from lmsys.steps import common
from lmsys.text import format_text

log = logging.getLogger(__name__)


def teacher_names(cfg: dict) -> list[str]:
    return list(cfg["models"]["teachers"])


def filter_model(cfg: dict) -> str:
    """The post-pretrained model that filters (step 2.5): the first teacher."""
    return teacher_names(cfg)[0]


# ---------------------------------------------------------------- tokenizer (tiny only)

def run_tokenizer(cfg: dict, layout: Layout) -> StepResult:
    """Train the tiny profile's BPE on the prepared text; other profiles use the models' own."""
    from lmsys import models
    kinds = {common.spec(cfg, m)["kind"] for m in [*teacher_names(cfg), cfg["models"]["student"]]}
    with atomic_dir(layout.tokenizer) as tmp:
        if kinds & set(models.TRAINED_TOKENIZER_KINDS):
            texts = [format_text(p, a, b, cfg["text"]) for name in ("train", "external", "ut", "test")
                     for p, a, b in common.table(layout, name)[["prompt", "response_a", "response_b"]].itertuples(index=False)]
            tok = models.train_tokenizer(texts, tmp, vocab_size=cfg["models"].get("tiny_vocab", 1024))
            info = {"trained": True, "vocab_size": len(tok), "texts": len(texts)}
        else:
            info = {"trained": False, "reason": "no tiny model in this profile: each model uses its own tokenizer"}
        (tmp / "tokenizer_info.json").write_text(json.dumps(info, indent=2))
    return StepResult(outputs=[layout.tokenizer], metrics=info)


# ---------------------------------------------------------------- step 1

def run_post_pretrain(cfg: dict, layout: Layout, model: str) -> StepResult:
    """Step 1: train `model` as a 3-class classifier on the UT data (held-out 10% for validation)."""
    train, val = post_pretrain_rows(cfg, layout)
    out = layout.post_pretrain(model)
    if not cfg["post_pretrain"]["enabled"]:     # the ablation "no post-pretraining": the adapter as built
        _, net = common.build(cfg, layout, model)
        return _save_untrained(net, out, len(train), len(val))
    metrics = common.fit(cfg, layout, model=model, out=out, section="post_pretrain", train=train, val=val, init_adapter=None,
                         seed=cfg["seed"], desc=f"post-pretrain {model}")
    return StepResult(outputs=[out], metrics=_summary(metrics))


def _save_untrained(net, out: Path, n_train: int, n_val: int) -> StepResult:
    """post_pretrain.enabled false: publish the freshly built adapter (LoRA B = 0, so the base model,
    and the new head), where later steps look for step 1's, with metrics saying nothing was trained."""
    metrics = {"steps": 0, "n_train": 0, "n_val": 0, "skipped": "post_pretrain.enabled is false",
               "ut_rows_not_used": n_train + n_val}
    with atomic_dir(out) as tmp:
        net.save_pretrained(tmp / "adapter")
        write_json(metrics, tmp / "metrics.json")
    return StepResult(outputs=[out], metrics=metrics)


def post_pretrain_rows(cfg: dict, layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, held-out rows) of step 1: the UT table (cut to post_pretrain.max_rows),
    shuffled with the run's seed, the first 10% held out. The same split for every model, so the
    held-out rows are seen by no post-pretrained model and no student built on one."""
    p = cfg["post_pretrain"]
    ut = common.table(layout, "ut")
    if p["max_rows"] is not None:
        ut = ut.sample(n=min(p["max_rows"], len(ut)), random_state=cfg["seed"])
    ut = ut.sample(frac=1.0, random_state=cfg["seed"]).reset_index(drop=True)
    n_val = max(1, len(ut) // 10)
    return ut.iloc[n_val:], ut.iloc[:n_val]


def _summary(m: dict) -> dict:
    return {k: m.get(k) for k in ("steps", "n_train", "n_val", "train_loss_first", "train_loss_last",
                                  "best_val_log_loss", "val_accuracy", "samples_per_s", "train_seconds")}


# ---------------------------------------------------------------- step 2.5

def resumable_logits(cfg: dict, model: str, net, tok, ids: list[list[int]], out: Path, adapter_dir: Path,
                     batch_size: int, desc: str, progress_every: int | None = None) -> tuple[np.ndarray, str]:
    """(logits of `net` (model `model` with the adapter at adapter_dir) on `ids`, the inference path
    taken) through lmsys.infer.predict_logits_resumable on the path lmsys.infer.route picks from
    params.yaml's `infer` (packed on a verified GPU, padded elsewhere): shards of
    orchestration.shard_rows rows in shard_dir(out), keyed by the model's spec, the adapter's content
    and the path, so a killed job resumes at its last finished shard. The caller writes `out`, then
    removes shard_dir(out)."""
    from lmsys.infer import predict_logits_resumable, route
    from lmsys.io import content_hash
    key = json.dumps({"spec": common.spec(cfg, model), "adapter": content_hash(adapter_dir)}, sort_keys=True, default=str)
    path = route(net, cfg["infer"])
    log.info("%s: %s inference", desc, path.describe())
    logits, _ = predict_logits_resumable(net, ids, tok.pad_token_id, batch_size, shard_dir(out),
                                         int(cfg["orchestration"]["shard_rows"]), key=key,
                                         progress_every=progress_every, desc=desc, path=path)
    return logits, path.describe()


def shard_dir(out: Path) -> Path:
    """Where the inference shards of output `out` live until it is written: `.<name>.shards/` beside it."""
    return out.with_name(f".{out.name}.shards")


def run_filter_score(cfg: dict, layout: Layout, model: str) -> StepResult:
    """Step 2.5, once per filtering model: probabilities of the post-pretrained `model` on every
    competition and external row (the union of all folds' training parts), in resumable shards.
    Output columns: id, label, p_a, p_b, p_tie."""
    rows = common.competition_and_external(layout)
    if rows["id"].duplicated().any():
        raise ValueError(f"{layout.prepared}: duplicate ids in train/external, e.g. "
                         f"{rows['id'][rows['id'].duplicated()].iloc[0]!r}: filter scores are joined by id")
    adapter = common.adapter(layout.post_pretrain(model))
    tok, net = common.build(cfg, layout, model, init_adapter=adapter, trainable=False)
    out = layout.filter_scores(model)
    ids = common.encode(cfg, rows, tok, cfg["text"]["train_max_length"])
    logits, path = resumable_logits(cfg, model, net, tok, ids, out, adapter, cfg["teacher_logits"]["batch_size"],
                                    f"filter-score {model}", cfg["teacher_logits"]["progress_every"])
    if not distributed.is_main():              # data-parallel: the ranks computed the shards, rank 0 writes
        return StepResult(outputs=[out])
    probs = softmax(logits)
    write_table(pd.DataFrame({"id": rows["id"], "label": common.labels(rows), "p_a": probs[:, 0], "p_b": probs[:, 1],
                              "p_tie": probs[:, 2]}), out)
    shutil.rmtree(shard_dir(out), ignore_errors=True)
    return StepResult(outputs=[out], metrics={"model": model, "rows": len(rows), "inference": path})


def run_filter_argmax(cfg: dict, layout: Layout, fold: int) -> StepResult:
    """Step 2.5: remove fold `fold`'s training rows whose post-pretrained argmax is wrong with
    probability >= filter_argmax.threshold, reading the filter model's scores (filter-score), so no
    model runs per fold. Validation rows are never touched. Raises ValueError when a training row
    has no score."""
    name = filter_model(cfg)
    train, _ = common.fold_tables(layout, fold)
    scores = pd.read_parquet(layout.filter_scores(name)).set_index("id")
    missing = ~train["id"].isin(scores.index)
    if missing.any():
        raise ValueError(f"{layout.filter_scores(name)}: no score for {int(missing.sum())} training rows of fold "
                         f"{fold} (first id {train['id'][missing].iloc[0]!r}); rerun filter-score")
    probs = scores.loc[train["id"], ["p_a", "p_b", "p_tie"]].to_numpy()
    pred, conf = probs.argmax(1), probs.max(1)
    drop = (pred != common.labels(train)) & (conf >= cfg["filter_argmax"]["threshold"])
    per_class = {lab: int(drop[common.labels(train) == k].sum()) for k, lab in enumerate(("A", "B", "tie"))}
    report = {"fold": fold, "model": name, "threshold": cfg["filter_argmax"]["threshold"],
              "rows_in": len(train), "rows_removed": int(drop.sum()), "rows_kept": int((~drop).sum()),
              "removed_per_class": per_class}
    log.info("filter-argmax fold %d: removed %d of %d training rows %s", fold, drop.sum(), len(train), per_class)
    with atomic_dir(layout.filtered(fold)) as tmp:
        pd.DataFrame({"id": train["id"][~drop]}).to_csv(tmp / "train_ids.csv", index=False)
        pd.DataFrame({"id": train["id"][drop], "label": common.labels(train)[drop], "confidence": conf[drop]}
                     ).to_csv(tmp / "removed.csv", index=False)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return StepResult(outputs=[layout.filtered(fold)], metrics=report)


# ---------------------------------------------------------------- step 3

def run_train_teacher(cfg: dict, layout: Layout, model: str, fold: int) -> StepResult:
    """Step 3: (Q)LoRA teacher on fold `fold`, from the post-pretrained adapter; resumable."""
    _, val = common.fold_tables(layout, fold)
    metrics = common.fit(cfg, layout, model=model, out=layout.teacher(model, fold), section="train_teacher",
                         train=common.filtered_train(cfg, layout, fold), val=val,
                         init_adapter=common.adapter(layout.post_pretrain(model)), seed=cfg["seed"] + fold,
                         desc=f"teacher {model} fold{fold}")
    return StepResult(outputs=[layout.teacher(model, fold)], metrics={"model": model, "fold": fold, **_summary(metrics)})


# ---------------------------------------------------------------- step 4

def _subset(df: pd.DataFrame, spec: str | None) -> pd.DataFrame:
    """The seed's INFER_*_SUBSET "start-end" row range of the training part (null = all)."""
    if not spec:
        return df
    start, end = (int(x) for x in str(spec).split("-"))
    return df.iloc[start:end]


def logit_inputs(cfg: dict, rows: pd.DataFrame, tok) -> list[list[int]]:
    """Token ids of step 4's rows: the training rows (split "train", the student's soft targets) as
    the student reads them, the same template truncated to text.train_max_length, so the targets
    describe the text the student trains on; the validation rows (out-of-fold scores) at
    text.infer_max_length, as at inference. Row order is kept."""
    is_train = (rows["split"] == "train").to_numpy()
    out: list = [None] * len(rows)
    for mask, length in ((is_train, cfg["text"]["train_max_length"]), (~is_train, cfg["text"]["infer_max_length"])):
        for i, ids in zip(np.flatnonzero(mask), common.encode(cfg, rows[mask], tok, length)):
            out[i] = ids
    return out


def run_teacher_logits(cfg: dict, layout: Layout, model: str, fold: int) -> StepResult:
    """Step 4: raw [A, B, tie] logits of teacher `model` of fold `fold` on every training row of the
    fold (original and swapped, the student's training set, at the student's truncation: see
    logit_inputs) and on its validation rows (out of fold, both orders). Output columns: id, swapped, split, label, logit_a, logit_b, logit_tie."""
    c = cfg["teacher_logits"]
    train = _subset(common.filtered_train(cfg, layout, fold), c["subset"]).assign(split="train")
    _, val = common.fold_tables(layout, fold)
    from lmsys.data.transforms import with_swaps
    rows = pd.concat([train, with_swaps(val).assign(split="val")], ignore_index=True)
    adapter = common.adapter(layout.teacher(model, fold))
    tok, net = common.build(cfg, layout, model, init_adapter=adapter, trainable=False)
    ids = logit_inputs(cfg, rows, tok)
    logits, path = resumable_logits(cfg, model, net, tok, ids, layout.logits(model, fold), adapter, c["batch_size"],
                                    f"logits {model} fold{fold}", c["progress_every"])   # resumable shards
    if not distributed.is_main():              # data-parallel: the ranks computed the shards, rank 0 writes
        return StepResult(outputs=[layout.logits(model, fold)])
    if not np.isfinite(logits).all():
        raise FloatingPointError(f"teacher {model} fold {fold}: non-finite logits")
    out = pd.DataFrame({"id": rows["id"], "swapped": rows["swapped"], "split": rows["split"],
                        "label": common.labels(rows), "logit_a": logits[:, 0], "logit_b": logits[:, 1],
                        "logit_tie": logits[:, 2]})
    write_table(out, layout.logits(model, fold))
    shutil.rmtree(shard_dir(layout.logits(model, fold)), ignore_errors=True)
    v = out[out["split"] == "val"]
    from lmsys.metrics import log_loss
    oof = log_loss(softmax(v[["logit_a", "logit_b", "logit_tie"]].to_numpy()), v["label"].to_numpy())
    return StepResult(outputs=[layout.logits(model, fold)],
                      metrics={"model": model, "fold": fold, "rows": len(out), "val_log_loss": oof, "inference": path})
