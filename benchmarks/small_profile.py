"""The `small` profile end to end on real data, on this CPU, with out-of-fold scores next to the
trivial baselines.

Data: competition = ../shared/data/vicuna80_human.csv (data.train), UT = vicuna80_llm_judges.csv.gz
(data.ut), no external, no test. The pipeline's prepare step dedupes it (1760 -> 1171 rows: the
same battle judged the same way by several annotators is one row); `--rows N` then keeps a seeded
subset of N of those rows spread over all 80 prompts, so the CPU run fits (the subset file is
written into the work root and is what data.train points at).

Steps (lmsys.steps.recipe.run_step, in an isolated root, default benchmarks/work/small_profile):
  prepare, folds (3, grouped by prompt), tokenizer, post-pretrain(gemma3), filter-argmax(k),
  train-teacher(gemma3, k), teacher-logits(gemma3, k), calibrate(gemma3), distill(k)
Predict/evaluate are skipped: the OOF scores are computed here from the files the steps write
(teacher: logits/<m>/fold<k>.parquet validation rows; student: students/fold<k>/oof.parquet).

Baselines on exactly the same rows and folds: the class prior (fold-train class frequencies) and a
logistic regression on response-length features (log words of A and B, their difference and its
absolute value). Also the same baselines on the full file, 5-fold grouped by prompt, to check them
against ../shared/data/README.md (prior 0.970, length LR 0.830).

Resumable: a step whose outputs exist is not rerun (--fresh starts over); step timings are kept
in <root>/timings.json. Writes benchmarks/results/small_profile.json and the "Small profile" part of
the "CPU (this machine)" section of benchmarks/RESULTS.md.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/small_profile.py [--rows 150] [--threads 1] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lmsys import models  # noqa: E402
from lmsys.config import load_config, parse_override  # noqa: E402
from lmsys.data import schema  # noqa: E402
from lmsys.data.folds import make_folds  # noqa: E402
from lmsys.data.transforms import dedupe  # noqa: E402
from lmsys.data.validate import validate_file  # noqa: E402
from lmsys.metrics import accuracy, log_loss, softmax  # noqa: E402
from lmsys.paths import Layout  # noqa: E402
from lmsys.steps import serve  # noqa: E402
from lmsys.steps.recipe import STEPS, run_step  # noqa: E402
from lmsys.tta import symmetrize  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_inference import machine, update_results_md  # noqa: E402

DATA = (HERE.parent / ".." / "shared" / "data").resolve()
HUMAN, JUDGES = DATA / "vicuna80_human.csv", DATA / "vicuna80_llm_judges.csv.gz"
REFERENCE = {"class_prior_5fold": 0.970, "length_lr_5fold": 0.830, "length_lr_accuracy_5fold": 0.67,
             "uniform": float(np.log(3))}

# CPU-sized settings on top of profiles.small (params.yaml is not changed); --set overrides these.
CPU_OVERRIDES = {
    "folds.n_folds": 3,
    "post_pretrain.max_rows": 48,
    "train_teacher.subset_size": 24,
    "train_teacher.eval_every": 1000,      # validate once, at the end (each validation is a full pass)
    "distill.eval_every": 1000,
    "text.train_max_length": 256,
    "text.infer_max_length": 256,
}
log = logging.getLogger("small_profile")


# ---------------------------------------------------------------- data

def subset_file(root: Path, rows: int | None, seed: int) -> tuple[Path, dict]:
    """The competition file the run uses: the deduped rows of vicuna80_human.csv (the ones prepare
    keeps), cut to `rows` spread evenly over the prompts (seeded); original CSV rows, unchanged."""
    raw = pd.read_csv(HUMAN)
    clean, _ = dedupe(validate_file(HUMAN, source="kaggle").clean)
    info = {"file_rows": len(raw), "deduped_rows": len(clean), "prompts": int(clean["prompt"].map(schema.prompt_key).nunique())}
    if rows is None or rows >= len(clean):
        return HUMAN, {**info, "used_rows": len(clean)}
    rng = np.random.default_rng(seed)
    order = clean.assign(g=clean["prompt"].map(schema.prompt_key), r=rng.random(len(clean)))
    order["rank"] = order.sort_values("r").groupby("g").cumcount()       # round-robin over prompts
    keep = order.sort_values(["rank", "r"]).head(rows)["id"].astype(str)
    out = root / "inputs" / f"vicuna80_human_{rows}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw[raw["id"].astype(str).isin(set(keep))].to_csv(out, index=False)
    return out, {**info, "used_rows": int(len(keep))}


# ---------------------------------------------------------------- baselines

def length_features(df: pd.DataFrame) -> np.ndarray:
    words = lambda col: np.array([len("\n".join(t or "" for t in turns).split()) for turns in df[col]])  # noqa: E731
    a, b = np.log1p(words("response_a")), np.log1p(words("response_b"))
    return np.column_stack([a, b, a - b, np.abs(a - b)])


def baseline_probs(df: pd.DataFrame, fold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OOF probabilities [n, 3] of the class prior and of the length logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = length_features(df), df["label"].to_numpy()
    prior, lr = np.zeros((len(y), 3)), np.zeros((len(y), 3))
    for k in np.unique(fold):
        tr, va = fold != k, fold == k
        prior[va] = np.bincount(y[tr], minlength=3) / tr.sum()
        lr[va] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[tr], y[tr]).predict_proba(X[va])
    return prior, lr


def baselines(df: pd.DataFrame, fold: np.ndarray) -> dict:
    """OOF class prior and length logistic regression of `df` (label column) on the given folds."""
    y = df["label"].to_numpy()
    prior, lr = baseline_probs(df, fold)
    return {"rows": len(y), "folds": int(len(np.unique(fold))),
            "class_prior": {"log_loss": log_loss(prior, y), "accuracy": accuracy(prior, y)},
            "length_lr": {"log_loss": log_loss(lr, y), "accuracy": accuracy(lr, y)}}


def reference_baselines(seed: int) -> dict:
    """The README's setting (full file, 5 folds grouped by prompt) and the deduped full file, 3 folds."""
    full = validate_file(HUMAN, source="kaggle").clean
    dd, _ = dedupe(full)
    out = {}
    for name, df, k in (("full_file_5fold", full, 5), ("deduped_3fold", dd, 3)):
        # ids repeat across annotators in neither file, but fold by position to be safe
        f = make_folds(df.assign(id=np.arange(len(df)).astype(str)), k, seed)["fold"].to_numpy()
        out[name] = baselines(df, f)
    return out


# ---------------------------------------------------------------- OOF scores from the step outputs

def score(probs: np.ndarray, y: np.ndarray) -> dict:
    return {"log_loss": log_loss(probs, y), "accuracy": accuracy(probs, y)}


def teacher_oof(layout: Layout, model: str, folds: list[int], calibrated: bool) -> dict:
    path = layout.calibrated_logits if calibrated else layout.logits
    v = pd.concat([pd.read_parquet(path(model, k)).assign(fold=k) for k in folds])
    v = v[v["split"] == "val"]
    o = v[~v["swapped"]].set_index("id")
    s = v[v["swapped"]].set_index("id").loc[o.index]
    po, ps = softmax(o[schema.LOGIT_COLUMNS].to_numpy()), softmax(s[schema.LOGIT_COLUMNS].to_numpy())
    y = o["label"].to_numpy()
    return {"rows": len(o), "plain": score(po, y), "tta": score(symmetrize(po, ps), y),
            "mean_probs": po.mean(0).round(4).tolist()}


def student_oof(cfg: dict, layout: Layout) -> dict:
    """The students' out-of-fold scores, plain and with TTA, from the rows step 9 scores (serve.student_oof)."""
    plain, tta = (serve.student_oof(cfg, layout, tta=t) for t in (False, True))
    y = plain["label"].to_numpy()
    return {"rows": len(plain), "plain": score(plain[serve.OOF_PROBS].to_numpy(), y),
            "tta": score(tta[serve.OOF_PROBS].to_numpy(), y),
            "mean_probs": plain[serve.OOF_PROBS].to_numpy().mean(0).round(4).tolist()}


def same_fold_baselines(layout: Layout) -> dict:
    train = pd.read_parquet(layout.prepared / "train.parquet")
    folds = pd.read_csv(layout.folds_csv, dtype={"id": str}).set_index("id")["fold"]
    return baselines(train, train["id"].astype(str).map(folds).to_numpy())


def paired_intervals(cfg: dict, layout: Layout) -> dict:
    """The student's OOF row losses (with TTA, as the report scores it) against the class prior and
    the length LR on the same rows and folds: mean of (baseline - student) and its bootstrap 95%
    interval (lmsys.metrics.paired_bootstrap; above 0 = the student is better)."""
    from lmsys.metrics import paired_bootstrap, row_losses
    train = pd.read_parquet(layout.prepared / "train.parquet").assign(id=lambda d: d["id"].astype(str))
    fmap = pd.read_csv(layout.folds_csv, dtype={"id": str}).set_index("id")["fold"]
    prior, lr = baseline_probs(train, train["id"].map(fmap).to_numpy())
    o = serve.student_oof(cfg, layout, tta=True)
    pos = train.reset_index(drop=True).reset_index().set_index("id").loc[o["id"], "index"].to_numpy()
    y = o["label"].to_numpy()
    assert (train["label"].to_numpy()[pos] == y).all(), "OOF labels differ from the prepared table's"
    student = row_losses(o[serve.OOF_PROBS].to_numpy(), y)
    return {"student_vs_class_prior": paired_bootstrap(row_losses(prior[pos], y), student),
            "student_vs_length_lr": paired_bootstrap(row_losses(lr[pos], y), student)}


# ---------------------------------------------------------------- the run

def distill_tasks(cfg: dict) -> list[tuple[str, dict]]:
    """The recipe's tasks of this run (lmsys.steps.recipe.tasks_of) up to distillation: no test data, so
    no ensemble/predict/evaluate. A student that is also a teacher is post-pretrained once."""
    from lmsys.steps.recipe import tasks_of
    tasks = tasks_of(cfg)
    last = max(i for i, (n, _) in enumerate(tasks) if n == "distill")
    dup = cfg["models"]["student"] in cfg["models"]["teachers"]
    return [(n, k) for n, k in tasks[:last + 1] if not (dup and n == "post-pretrain-student")]


def run(cfg: dict, layout: Layout, resume: bool) -> dict:
    tfile = layout.root / "timings.json"
    timings = json.loads(tfile.read_text()) if resume and tfile.exists() else {}
    for name, keys in distill_tasks(cfg):
        label = name + "".join(f"[{k}={v}]" for k, v in keys.items())
        outs = STEPS[name].outputs(cfg, layout, **keys)
        if resume and label in timings and all(Path(p).exists() for p in outs):
            log.warning("%-40s done earlier (%.0f s)", label, timings[label]["wall_s"])
            continue
        c0, t0 = time.process_time(), time.perf_counter()
        res = run_step(name, cfg, layout, **keys)
        timings[label] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                          "load_avg_1m": os.getloadavg()[0], "metrics": res.metrics}
        tfile.write_text(json.dumps(timings, indent=2, default=float))
        log.warning("%-40s %.0f s wall, %.0f s cpu", label, timings[label]["wall_s"], timings[label]["cpu_s"])
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(HERE / "work" / "small_profile"))
    ap.add_argument("--rows", type=int, default=150, help="competition rows kept after dedup (0 = all 1171)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--fresh", action="store_true", help="delete the root first (else resume)")
    ap.add_argument("--no-load-cache", action="store_true", help="load every model from disk in every step")
    ap.add_argument("--out", default=str(HERE / "results" / "small_profile.json"))
    ap.add_argument("--md-only", action="store_true", help="only rewrite RESULTS.md from --out")
    ap.add_argument("--part", default="small-profile", help="the RESULTS.md block this run writes (<!-- cpu:PART -->)")
    ap.add_argument("--title", default="Small profile on real data (vicuna80), CPU-sized", help="its heading")
    ap.add_argument("--reading", default="", help="a paragraph of reading under the tables")
    args = ap.parse_args()
    if args.md_only:
        r = json.loads(Path(args.out).read_text())
        r["reading"] = args.reading or r.get("reading", "")
        update_results_md(args.part, markdown(r))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "lmsys.infer", "lmsys.train", "lmsys.steps.teachers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)

    base = load_config("small")
    train_file, data_info = subset_file(root, args.rows or None, base["seed"])
    overrides = {**CPU_OVERRIDES, "data.train": str(train_file), "data.ut": str(JUDGES),
                 "data.test": None, "data.external": None}
    overrides.update(dict(parse_override(s) for s in args.set))
    cfg = load_config("small", overrides)
    layout = Layout("small", root)
    t0 = time.perf_counter()
    mach = machine()                          # load average at the start (machine() reads it now)
    # each base model loaded once, deep copies handed out (the GGUF teacher takes ~30 s a load)
    reuse = models.reuse_base_models() if not args.no_load_cache else contextlib.nullcontext()
    with reuse:
        timings = run(cfg, layout, resume=not args.fresh)
    wall = time.perf_counter() - t0
    folds = list(range(cfg["folds"]["n_folds"]))
    teacher = cfg["models"]["teachers"][0]
    cal = json.loads(layout.calibration(teacher).read_text())
    results = {
        "benchmark": "small_profile", "machine": mach, "torch_threads": args.threads, "args_rows": args.rows,
        "title": args.title, "out_name": os.path.relpath(args.out, HERE.parent), "cli_set": dict(parse_override(x) for x in args.set),
        "teacher": teacher, "student": cfg["models"]["student"], "specs": cfg["models"]["specs"], "reading": args.reading,
        "load_avg_at_end": list(os.getloadavg()), "base_model_load_cache": not args.no_load_cache,
        "data": {"train": str(train_file), "ut": str(JUDGES), **data_info},
        "overrides": {k: v for k, v in overrides.items()},
        "config": {s: cfg[s] for s in ("folds", "text", "post_pretrain", "filter_argmax", "train_teacher",
                                       "teacher_logits", "calibrate", "distill")},
        "steps": timings,
        "total_wall_s_this_invocation": wall,
        "total_step_wall_s": sum(t["wall_s"] for t in timings.values()),
        "total_step_cpu_s": sum(t["cpu_s"] for t in timings.values()),
        "oof": {
            "teacher_raw": teacher_oof(layout, teacher, folds, calibrated=False),
            "teacher_calibrated_in_sample": teacher_oof(layout, teacher, folds, calibrated=True),
            "teacher_calibration_heldout": {"before": cal["heldout_log_loss_before"],
                                            "after": cal["heldout_log_loss_after"], "method": cal["method"]},
            "student": student_oof(cfg, layout),
            "baselines_same_folds": same_fold_baselines(layout),
            "paired": paired_intervals(cfg, layout),
        },
        "reference": {"readme": REFERENCE, "recomputed": reference_baselines(cfg["folds"]["seed"])},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md = markdown(results)
    update_results_md(args.part, md)
    print(md)


def _model_words(r: dict, name: str) -> str:
    spec = r.get("specs", {}).get(name, {})
    what = spec.get("package") or spec.get("path") or spec.get("kind") or "?"
    lora = spec.get("lora") or {}
    return f"{name} ({what}{', LoRA r=' + str(lora['r']) if lora.get('r') else ''})"


def markdown(r: dict) -> str:
    o, b = r["oof"], r["oof"]["baselines_same_folds"]
    m, ref = r["machine"], r["reference"]["recomputed"]
    ll = lambda d: f"{d['log_loss']:.3f}"  # noqa: E731
    acc = lambda d: f"{d['accuracy']:.3f}"  # noqa: E731
    c = r["config"]
    teacher, student = r.get("teacher", "gemma3"), r.get("student", "minilm")
    sets = " ".join(f"--set '{k}={v if isinstance(v, str) else json.dumps(v)}'" for k, v in r.get("cli_set", {}).items())
    subset = c["train_teacher"]["subset_size"]
    lines = [
        f"### {r.get('title', 'Small profile on real data (vicuna80), CPU-sized')}",
        "",
        f"`python benchmarks/small_profile.py --rows {r['args_rows']} --threads {r['torch_threads']} {sets}`".replace("  ", " ")
        + f" -> `{r.get('out_name', 'benchmarks/results/small_profile.json')}`. "
        f"Machine: {m['cpu']}, {m['cores']} cores (load average {r['load_avg_at_end'][0]:.1f} at the end), "
        f"torch {m['torch']} on {r['torch_threads']} thread(s).",
        "",
        f"Data: vicuna80_human.csv ({r['data']['file_rows']} rows; {r['data']['deduped_rows']} after the prepare step's dedup), "
        f"{r['data']['used_rows']} rows used over {r['data']['prompts']} prompts, {c['folds']['n_folds']} folds grouped by prompt "
        f"(~{r['data']['used_rows'] // c['folds']['n_folds']} validation rows per fold). UT = vicuna80_llm_judges "
        f"(post-pretrain on {c['post_pretrain']['max_rows']} rows). Teacher {_model_words(r, teacher)} trained on "
        f"{'every training row' if subset is None else f'{subset} rows'} per fold (+ A/B swaps), {c['train_teacher'].get('epochs')} epoch(s); "
        f"student {_model_words(r, student)} distilled on the same rows, {c['distill'].get('epochs')} epoch(s); "
        f"max length {c['text']['train_max_length']} tokens; template {c['text']['template']!r}.",
        "",
        "| out-of-fold, same rows and folds | log loss | accuracy |",
        "|---|---|---|",
        f"| uniform | {np.log(3):.3f} | - |",
        f"| class prior (fold-train frequencies) | {ll(b['class_prior'])} | {acc(b['class_prior'])} |",
        f"| length-feature logistic regression | {ll(b['length_lr'])} | {acc(b['length_lr'])} |",
        f"| teacher {teacher}, raw | {ll(o['teacher_raw']['plain'])} | {acc(o['teacher_raw']['plain'])} |",
        f"| teacher {teacher}, raw + TTA | {ll(o['teacher_raw']['tta'])} | {acc(o['teacher_raw']['tta'])} |",
        f"| teacher {teacher}, calibrated (step 4.5, held-out halves: before -> after) | "
        f"{o['teacher_calibration_heldout']['before']:.3f} -> {o['teacher_calibration_heldout']['after']:.3f} | - |",
        f"| student {student}, distilled | {ll(o['student']['plain'])} | {acc(o['student']['plain'])} |",
        f"| student {student}, distilled + TTA (the report's figure) | {ll(o['student']['tta'])} | {acc(o['student']['tta'])} |",
        "",
    ]
    if "paired" in o:
        pr, pl = o["paired"]["student_vs_class_prior"], o["paired"]["student_vs_length_lr"]
        iv = lambda d: f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"  # noqa: E731
        lines += [f"Paired over the {pr['n']} out-of-fold rows (baseline's row loss - student's with TTA; bootstrap 95% "
                  f"interval; above 0 = the student is better): vs the class prior {iv(pr)}, vs the length LR {iv(pl)}.", ""]
    lines += [
        f"Baseline check on the full file (the README's setting): class prior {ll(ref['full_file_5fold']['class_prior'])}, "
        f"length LR {ll(ref['full_file_5fold']['length_lr'])} (accuracy {acc(ref['full_file_5fold']['length_lr'])}), 5 folds "
        f"grouped by prompt (README: 0.970, 0.830, 0.67); on the deduped 1171 rows, 3 folds: prior "
        f"{ll(ref['deduped_3fold']['class_prior'])}, length LR {ll(ref['deduped_3fold']['length_lr'])}.",
        "",
        "| step | wall s | CPU s |",
        "|---|---|---|",
    ]
    for k, t in r["steps"].items():
        lines.append(f"| {k} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} |")
    lines.append(f"| **total** | {r['total_step_wall_s']:.0f} | {r['total_step_cpu_s']:.0f} |")
    if r.get("reading"):
        lines += ["", r["reading"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
