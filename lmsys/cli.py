"""`lmsys ...`: thin command line over the library (parse, call, print). See README for the list."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lmsys.config import load_config, parse_override
from lmsys.paths import Layout


def _config(args) -> dict:
    overrides = dict(parse_override(o) for o in (getattr(args, "set", None) or []))
    return load_config(getattr(args, "profile", None), overrides, getattr(args, "params", None))


def cmd_validate(args) -> int:
    from lmsys.data.validate import UnusableFile, validate_file
    from lmsys.io import write_json, write_table
    try:
        v = validate_file(args.path, args.format)
    except UnusableFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = v.report()
    print(f"{args.path}: format {rep['format']}, {rep['rows_in']} rows: {rep['rows_clean']} clean, "
          f"{rep['rows_quarantined']} quarantined")
    for reason, n in rep["reasons"].items():
        first = v.quarantine.loc[v.quarantine["reason"] == reason, "row"].head(5).tolist()
        print(f"  {reason}: {n} (first rows: {', '.join(map(str, first))})")
    for w, n in rep["warnings"].items():
        print(f"  warning {w}: {n}")
    if args.out:
        out = Path(args.out)
        write_table(v.clean, out / "clean.parquet")
        write_table(v.quarantine, out / "quarantine.csv")
        write_json(rep, out / "report.json")
    return 1 if rep["rows_quarantined"] else 0


def cmd_folds(args) -> int:
    if args.path is None:                       # the pipeline step on the prepared tables
        return cmd_step(args)
    import pandas as pd

    from lmsys.data.folds import make_folds
    from lmsys.data.validate import UnusableFile, validate_file
    from lmsys.io import write_table
    try:
        comp = validate_file(args.path).clean
        ext = [validate_file(p).clean for p in args.external or []]
    except UnusableFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folds = make_folds(comp, args.n_folds, args.seed, pd.concat(ext, ignore_index=True) if ext else None)
    write_table(folds, Path(args.out) / "folds.csv")
    print(f"wrote {Path(args.out) / 'folds.csv'}: {len(folds)} rows, {args.n_folds} folds")
    return 0


def cmd_demo_data(args) -> int:
    from lmsys.data.demo import make_demo_data
    paths = make_demo_data(args.out, rows=args.rows, seed=args.seed)
    truth = json.loads(Path(paths["truth"]).read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    print(f"train: bayes log loss {truth['train']['bayes_log_loss']:.4f}, prior {truth['train']['prior_log_loss']:.4f}")
    return 0


def step_keys(args) -> dict:
    """The step's own fan-out keys from the parsed options (`lmsys predict --model DIR` without
    --test runs step 8, whose --model is not a key of it)."""
    from lmsys.steps import STEPS
    return {k: getattr(args, k) for k in STEPS[args.step].fan_out if getattr(args, k, None) is not None}


def cmd_step(args) -> int:
    from lmsys.steps.registry import run_step
    cfg = _config(args)
    result = run_step(args.step, cfg, Layout(cfg["profile"], cfg.get("root")), **step_keys(args))
    print(json.dumps({"outputs": [str(p) for p in result.outputs], "metrics": result.metrics},
                     indent=2, default=str))
    return 0


def cmd_calibrate(args) -> int:
    if args.action is None:                     # the pipeline step
        return cmd_step(args)
    from lmsys.calibration import calibrate_apply_file, calibrate_fit_file
    if args.action == "fit":
        p = calibrate_fit_file(args.preds, args.out, args.method)
        print(f"{args.method} scaling: log loss {p['nll_before']:.4f} -> {p['nll_after']:.4f} on {p['n']} rows; wrote {args.out}")
    else:
        calibrate_apply_file(args.preds, args.params_file, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_predict(args) -> int:
    if args.test is None:                       # the pipeline step
        return cmd_step(args)
    from lmsys.steps.serve import predict_file
    sub = predict_file(Path(args.test), Path(args.out), Path(args.model) if args.model else None, _config(args),
                       tta=not args.no_tta)
    print(f"wrote {args.out}: {len(sub)} rows")
    return 0


def cmd_evaluate(args) -> int:
    if args.preds is None:                      # the pipeline step
        return cmd_step(args)
    import pandas as pd

    from lmsys.calibration import read_predictions
    from lmsys.metrics import read_labels, softmax, summarize
    ids, logits, own = read_predictions(args.preds)
    if args.labels is None:                     # the predictions file's own `label` column
        if own is None:
            print(f"error: {args.preds} has no `label` column: pass --labels", file=sys.stderr)
            return 2
        labels = pd.Series(own, index=list(map(str, ids)))
    else:
        labels = read_labels(args.labels)
    missing = [i for i in map(str, ids) if i not in labels.index]
    if missing:
        print(f"error: {len(missing)} prediction ids have no label (first: {missing[:5]})", file=sys.stderr)
        return 2
    m = summarize(softmax(logits), labels.reindex(list(map(str, ids))).to_numpy(), args.bins)
    print(f"log loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}  ECE {m['ece']:.4f}  (n={m['n']})")
    return 0


def cmd_run(args) -> int:
    from flows.pipeline import run_from_cli
    return run_from_cli(args)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=("tiny", "small", "full"), help="default: params.yaml's profile")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. train_teacher.lr=1e-4")
    p.add_argument("--params", help="params file (default: the repo's params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    from lmsys.steps.registry import STEPS
    ap = argparse.ArgumentParser(prog="lmsys", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a data file; exit 0 ok, 1 rows quarantined, 2 file unusable")
    p.add_argument("path")
    p.add_argument("--format", default="auto", choices=("auto", "kaggle", "arena33k", "ultrafeedback"))
    p.add_argument("--out", help="write clean.parquet, quarantine.csv, report.json here")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("folds", help="step 2: folds.csv (id,fold) for a file, or the pipeline step without PATH")
    p.add_argument("path", nargs="?")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--out", default=".")
    p.add_argument("--external", action="append")
    _add_config_args(p)
    p.set_defaults(func=cmd_folds, step="folds")

    p = sub.add_parser("demo-data", help="write the embedded synthetic competition")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("calibrate", help="step 4.5 (--model M), or `calibrate fit|apply` on any predictions CSV")
    p.add_argument("action", nargs="?", choices=("fit", "apply"))
    p.add_argument("--preds", help="predictions CSV: id + logit_* or winner_* columns (+ label for fit)")
    p.add_argument("--out", help="fit: params JSON; apply: calibrated CSV")
    p.add_argument("--params-file", dest="params_file", help="apply: the params JSON written by fit")
    p.add_argument("--method", default="vector", choices=("vector", "temperature"))
    p.add_argument("--model", help="pipeline step: the teacher to calibrate")
    _add_config_args(p)
    p.set_defaults(func=cmd_calibrate, step="calibrate")

    p = sub.add_parser("predict", help="steps 8/8.5: submission for a test CSV (TTA), or the pipeline step without --test")
    p.add_argument("--test", help="Kaggle test.csv")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--model", help="model dir (default: the last pipeline run's final model)")
    p.add_argument("--no-tta", action="store_true", help="original order only")
    _add_config_args(p)
    p.set_defaults(func=cmd_predict, step="predict")

    p = sub.add_parser("evaluate", help="step 9: log loss / accuracy / ECE of a predictions CSV, or the pipeline step")
    p.add_argument("--preds")
    p.add_argument("--labels", help="id + label, or id + the three winner columns (default: the preds file's label column)")
    p.add_argument("--bins", type=int, default=15)
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate, step="evaluate")

    for name, step in STEPS.items():
        if name in ("folds", "demo-data", "calibrate", "predict", "evaluate"):
            continue
        doc = (step.run.__doc__ or name).strip().splitlines()[0].replace("%", "%%")
        p = sub.add_parser(name, help=f"pipeline step {step.number}: {doc}")
        _add_config_args(p)
        if "fold" in step.fan_out:
            p.add_argument("--fold", type=int, required=True)
        if "model" in step.fan_out:
            p.add_argument("--model", required=True)
        p.set_defaults(func=cmd_step, step=name)

    from lmsys import lineage                   # lineage / operations (lmsys/lineage.py)
    p = sub.add_parser("step", help="run any registry step by name (e.g. `step demo-data`, as dvc.yaml does)")
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--fold", type=int)
    p.add_argument("--model")
    _add_config_args(p)
    p.set_defaults(func=cmd_step)
    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the step registry (--check: exit 1 when stale)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--profile", choices=("tiny", "small", "full"), help="default: params.yaml's profile")
    p.add_argument("--out", help="write here instead of the repo's dvc.yaml")
    p.set_defaults(func=lineage.cmd_dvc_yaml)
    p = sub.add_parser("data", help="`data add FILE`: validate, copy into data/added/, dvc add, emit lmsys.data.added")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("add", help="add a data file (exit 1 when rows are quarantined, 2 when unusable)")
    p.add_argument("path")
    p.add_argument("--as", dest="kind", default="auto", choices=("auto", *lineage.KINDS),
                   help="table it feeds (auto: ut for UltraFeedback, test when unlabelled, else external)")
    p.add_argument("--allow-quarantine", action="store_true", help="add it even when some rows are quarantined")
    p.add_argument("--no-event", action="store_true", help="do not emit the Prefect event")
    p.add_argument("--no-dvc", action="store_true", help="do not `dvc add` it")
    p.set_defaults(func=lineage.cmd_data_add)

    p = sub.add_parser("run", help="the whole pipeline as a Prefect flow")
    _add_config_args(p)
    p.add_argument("--runner", choices=("local", "slurm"))
    p.add_argument("--root", help="where data/, artifacts/ and reports/ go (default: the repo)")
    p.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
