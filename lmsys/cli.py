"""`lmsys ...`: thin command line over the library (parse, call, print). See README for the list.

Exit codes, the same for every command:
  0  ok
  1  a result with warnings: rows quarantined (validate, folds, data add), test rows answered by
     the fallback (predict --test), an input with no rows. A pipeline step command (`lmsys prepare`,
     `lmsys predict` without --test, ...) that completes exits 0 and names its warnings on stderr:
     dvc repro runs these commands and would fail the stage on 1
  2  bad input or usage: an unusable file, a bad parameter, a params file that fails its checks,
     an --out that is a directory or whose suffix is not .csv / .csv.gz / .parquet, a read-only
     --root / --out, a root another run holds (its lease names it)
  3  internal error (a bug or the machine): the message says so; a full disk names the file
  130  stopped by Ctrl-C (SIGINT); 143  stopped by SIGTERM (`kill`, `timeout`, SLURM's `scancel`):
     the local workers are stopped first, the flow run is marked Crashed, one `error:` line says so;
     finished steps are kept and a rerun resumes (training from its last checkpoint)
Errors are one line on stderr, `error: <file>: row <n> ...: <reason>` where a file and row are
known; no traceback unless `--debug` (anywhere on the command line) or LMSYS_DEBUG=1.

A run root is held by one command at a time: `lmsys run` and every step command take its lease
(<root>/artifacts/.lease.json, lmsys.lease) and refuse, exit 2, while another live process holds
it, naming that process (host, pid, command, flow run). A lease whose holder died (its pid gone on
this machine; elsewhere 30 s without a heartbeat) is taken over with a warning, and the dead run's
flow run, which nothing else would end, is marked Crashed (flows.lease).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from lmsys.config import PROFILES, load_config, parse_override
from lmsys.settings import RUNNERS
from lmsys.paths import Layout

EXIT_OK, EXIT_WARN, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# Exceptions that mean "the input is bad" (exit 2): the library raises ValueError (UnusableFile,
# ConfigError, pandas' parser errors and json.JSONDecodeError are ValueErrors too) or these for bad
# files, parameters and paths; anything else is an internal error (exit 3).
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class UsageError(ValueError):
    """A command was called with options that do not go together (exit 2)."""


def _config(args) -> dict:
    """The resolved config of a command's --profile / --set / --params, under its --root when it has one."""
    overrides = dict(parse_override(o) for o in (getattr(args, "set", None) or []))
    cfg = load_config(getattr(args, "profile", None), overrides, getattr(args, "params", None))
    if getattr(args, "root", None):
        cfg["root"] = str(args.root)
    return cfg


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def cmd_validate(args) -> int:
    from lmsys.data.validate import UnusableFile, validate_file
    from lmsys.io import write_json, write_table
    try:
        v = validate_file(args.path, args.format)
    except UnusableFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = v.report()
    if not rep["rows_in"]:
        print(f"error: {args.path}: no rows (a header only)", file=sys.stderr)
        return EXIT_WARN
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
    """`lmsys folds PATH`: folds.csv of a file's usable rows; quarantined rows are named (exit 1)."""
    if args.path is None:                       # the pipeline step on the prepared tables
        return cmd_step(args)
    import pandas as pd

    from lmsys.data.folds import make_folds
    from lmsys.data.validate import validate_file
    from lmsys.io import write_table
    files = [args.path, *(args.external or [])]
    checked = [validate_file(p) for p in files]
    quarantined = 0
    for path, v in zip(files, checked):
        rep = v.report()
        if not rep["rows_in"]:
            print(f"error: {path}: no rows", file=sys.stderr)
            return EXIT_WARN
        if rep["rows_quarantined"]:
            quarantined += rep["rows_quarantined"]
            first = v.quarantine["row"].head(5).tolist()
            print(f"warning: {path}: {rep['rows_quarantined']} of {rep['rows_in']} rows quarantined, left out of "
                  f"folds.csv {rep['reasons']} (first rows: {first}; see `lmsys validate`)", file=sys.stderr)
    _refuse_shared_ids(files, checked)
    ext = [v.clean for v in checked[1:]]
    folds = make_folds(checked[0].clean, args.n_folds, args.seed, pd.concat(ext, ignore_index=True) if ext else None)
    write_table(folds, Path(args.out) / "folds.csv")
    print(f"wrote {Path(args.out) / 'folds.csv'}: {len(folds)} rows, {args.n_folds} folds"
          + (f"; {quarantined} rows quarantined" if quarantined else ""))
    return EXIT_WARN if quarantined else EXIT_OK


def _refuse_shared_ids(files: list, checked: list) -> None:
    """folds.csv maps each id to one fold: an id in two of the files (`--external` naming the
    competition file itself) would be in two folds. Raises ValueError naming the files and ids."""
    first: dict[str, str] = {}
    for path, v in zip(files, checked):
        ids = v.clean["id"].astype(str)
        shared = sorted(set(ids) & first.keys())
        if shared:
            other = first[shared[0]]
            raise ValueError(f"{path}: {len(shared)} id(s) already in {other} (first: {', '.join(shared[:5])}): "
                             f"{'the same file twice? ' if str(other) == str(path) else ''}folds.csv maps each id "
                             "to one fold")
        first.update({i: path for i in ids})


def cmd_convert_ut(args) -> int:
    """`lmsys convert-ut RAW --out FILE`: the public UltraFeedback release in the competition format
    (rule: lmsys.data.ultrafeedback); exit 1 when some rows could not be converted."""
    from lmsys.data.ultrafeedback import convert_ultrafeedback
    from lmsys.data.validate import read_raw
    from lmsys.io import check_output_table, write_table
    check_output_table(args.out)
    out, info = convert_ultrafeedback(read_raw(args.path), tie_margin=args.tie_margin)
    skipped = "; ".join(f"{reason}: {n} (first rows: {', '.join(map(str, info['skipped_rows'][reason]))})"
                        for reason, n in info["skipped"].items())
    if not len(out):
        print(f"error: {args.path}: no battle could be converted: {skipped or 'no rows'}", file=sys.stderr)
        return EXIT_WARN
    write_table(out, args.out)
    labels = out[["winner_model_a", "winner_model_b", "winner_tie"]].sum().tolist()
    print(f"{args.path}: {info['schema']} schema, {info['rows_in']} rows -> {info['battles']} battles "
          f"(A/B/tie {labels[0]}/{labels[1]}/{labels[2]}); wrote {args.out}")
    if info["skipped"]:
        print(f"warning: {args.path}: skipped {sum(info['skipped'].values())}: {skipped}", file=sys.stderr)
    return EXIT_WARN if info["skipped"] else EXIT_OK


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
    from lmsys.steps.recipe import STEPS
    return {k: getattr(args, k) for k in STEPS[args.step].fan_out if getattr(args, k, None) is not None}


def cmd_step(args) -> int:
    """A pipeline step on the root's lease (lmsys.lease): never beside a run writing the same root."""
    from flows.lease import hold_root
    from lmsys.steps.recipe import run_step
    cfg = _config(args)
    with hold_root(Layout.of(cfg).root, say=_warn):
        result = run_step(args.step, cfg, Layout.of(cfg), **step_keys(args))
    print(json.dumps({"outputs": [str(p) for p in result.outputs], "metrics": result.metrics},
                     indent=2, default=str))
    warn = {k: result.metrics.get(k) for k in ("rows_quarantined", "fallback_rows") if result.metrics.get(k)}
    if warn:    # named, but exit 0: the step completed (dvc repro runs these commands; 1 would fail the stage)
        print(f"warning: step {args.step}: {warn} (see its report)", file=sys.stderr)
    return EXIT_OK


def cmd_calibrate(args) -> int:
    if args.action is None:                     # the pipeline step
        if args.model is None:
            raise UsageError("calibrate: give fit|apply, or --model M for the pipeline step")
        return cmd_step(args)
    from lmsys.calibration import calibrate_apply_file, calibrate_fit_file
    need = ["preds", "out"] + (["params_file"] if args.action == "apply" else [])
    missing = ["--" + n.replace("_", "-") for n in need if getattr(args, n) is None]
    if missing:
        raise UsageError(f"calibrate {args.action} needs {' and '.join(missing)}")
    if args.action == "apply":
        from lmsys.io import check_output_table
        check_output_table(args.out)
    if args.action == "fit":
        p = calibrate_fit_file(args.preds, args.out, args.method or "vector")
        if p.get("reason"):                    # refused: the identity, flagged in the file
            print(f"warning: {args.preds}: {p['reason']} (wrote {args.out}, fallback: true)", file=sys.stderr)
            return EXIT_WARN
        print(f"{p['method']} scaling fitted on {p['fitted_on']}: log loss {p['nll_before']:.4f} -> "
              f"{p['nll_after']:.4f} on {p['n']} rows; wrote {args.out}")
    else:
        calibrate_apply_file(args.preds, args.params_file, args.out, method=args.method)
        print(f"wrote {args.out}")
    return EXIT_OK


def cmd_predict(args) -> int:
    """`lmsys predict --test CSV`: every id answered; unreadable rows get the class prior, named in a
    warning (exit 1). With --model an exported bundle (`lmsys export`) it reads the bundle alone: no
    params.yaml, no pipeline root; package versions that differ from the exporting machine's are noted."""
    from lmsys.export import is_bundle, predict_bundle
    if args.model and is_bundle(Path(args.model)):
        if args.test is None or args.profile or args.params:
            raise UsageError("a bundle carries its own settings: give --test CSV (and --set KEY=VALUE of its "
                             "settings.json), not --profile or --params")
        overrides = dict(parse_override(o) for o in args.set or [])
        sub, fallback, notes = predict_bundle(Path(args.model), Path(args.test), Path(args.out), overrides,
                                              tta=not args.no_tta)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        return _predicted(args, sub, fallback)
    if args.test is None:                       # the pipeline step
        return cmd_step(args)
    from lmsys.io import check_output_table
    from lmsys.steps.serve import predict_file
    check_output_table(args.out)
    sub, fallback = predict_file(Path(args.test), Path(args.out), Path(args.model) if args.model else None,
                                 _config(args), tta=not args.no_tta)
    return _predicted(args, sub, fallback)


def _predicted(args, sub, fallback) -> int:
    """The lines of a finished `lmsys predict --test`: a warning per row answered by the fallback."""
    for r in fallback.head(20).itertuples(index=False):
        rid = f"id {r.id}" if r.id != "" else "no id: answered as id ''"
        print(f"warning: {args.test}: row {r.row} ({rid}): {r.reason}: answered with the class prior",
              file=sys.stderr)
    if len(fallback) > 20:
        print(f"warning: ... and {len(fallback) - 20} more rows answered with the class prior", file=sys.stderr)
    print(f"wrote {args.out}: {len(sub)} rows ({len(fallback)} answered by fallback)")
    return EXIT_WARN if len(fallback) else EXIT_OK


def cmd_export(args) -> int:
    """`lmsys export --out DIR`: the final model, its settings, manifest and wheels as one offline bundle
    (lmsys/export.py); exit 1 when a wheel could not be had offline (named, with the reason)."""
    from lmsys.export import export_bundle
    cfg = _config(args)
    if args.root:
        cfg["root"] = str(args.root)
    m = export_bundle(cfg, Path(args.out), Path(args.model) if args.model else None, tuple(args.wheel or ()),
                      wheels=not args.no_wheels)
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"wrote {args.out}: model {m['model']['source']} ({'GPTQ, ' if m['model']['quantized'] else ''}"
          f"{m['model']['serving']['dtype']} for {m['model']['serving']['cards'] or 'the device it was made on'}), "
          f"{len(m['files'])} files, {size / 2**20:.1f} MiB, wheels: {', '.join(w['file'] for w in m['wheels']) or 'none'}")
    for w in m["missing_wheels"]:
        print(f"warning: no wheel of {w['dist']} {w['version'] or ''}: {w['reason']}", file=sys.stderr)
    return EXIT_WARN if m["missing_wheels"] else EXIT_OK


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
            return EXIT_INPUT
        labels = pd.Series(own, index=list(map(str, ids)))
    else:
        labels = read_labels(args.labels)
    ids = pd.Series(list(map(str, ids)))
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        rows = dup.index[dup == first].tolist()
        print(f"error: {args.preds}: {dup.nunique()} ids appear more than once (first: id {first} at rows {rows})",
              file=sys.stderr)
        return EXIT_INPUT
    if labels.index.duplicated().any():
        print(f"error: {args.labels}: id {labels.index[labels.index.duplicated()][0]} has more than one label",
              file=sys.stderr)
        return EXIT_INPUT
    matched = ids.isin(labels.index)
    if not matched.all():
        print(f"error: {args.preds}: {(~matched).sum()} of {len(ids)} prediction ids have no label "
              f"(first: {ids[~matched].head(5).tolist()})", file=sys.stderr)
        return EXIT_INPUT
    m = summarize(softmax(logits), labels.reindex(ids).to_numpy(), args.bins)
    print(f"log loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}  ECE {m['ece']:.4f}  (n={m['n']}; "
          f"matched {int(matched.sum())}/{len(ids)} prediction ids, {len(labels)} labels)")
    return EXIT_OK


def cmd_run(args) -> int:
    """`lmsys run`: on the root's lease (a second run on the root exits 2 naming the holder), against
    a Prefect server that answers (started here when none does: flows.server.api_for_run)."""
    if args.params:
        raise UsageError(f"lmsys run reads the repo's params.yaml (the flow's workers must see the same file): "
                         f"--params {args.params} is not taken; change values with --set KEY=VALUE")
    if not (args.verbose or args.run_verbose):
        from lmsys.console import quiet_console
        quiet_console()                         # before Prefect is imported: one line per task on the console
    from lmsys import lease
    cfg = _config(args)
    with lease.hold(Layout.of(cfg).root):               # the flow holds it again, adding its flow-run id
        from flows.server import api_for_run
        api_for_run(say=lambda line: print(line, file=sys.stderr, flush=True),   # before Prefect is imported
                    runner=args.runner or cfg["orchestration"]["runner"])
        from flows.pipeline import run_from_cli
        return run_from_cli(args)


def cmd_ablate(args) -> int:
    """`lmsys ablate`: the default and each variant through the pipeline flow, then the table."""
    from lmsys.ablations import VARIANTS
    if args.list:
        for name, (what, over) in VARIANTS.items():
            print(f"{name:<20} {what}  ({', '.join(f'{k}={v}' for k, v in over.items())})")
        return EXIT_OK
    unknown = [v for v in args.only or [] if v not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    if args.params:
        raise UsageError("lmsys ablate reads the repo's params.yaml (the flow's workers must see the same file)")
    if not args.verbose:
        from lmsys.console import quiet_console
        quiet_console()
    from flows.ablations import run_from_cli as ablate
    return ablate(args)


def cmd_data_add(args) -> int:
    """`lmsys data add FILE`: validate, copy into data/added/, `dvc add` (stages/lineage.py), then emit the
    Prefect event `lmsys.data.added` (flows/events.py) that the event-triggered deployment listens for."""
    from stages.lineage import add_data
    bad = [c for c in str(args.path) if ord(c) < 32 or ord(c) == 127]
    if bad:   # a newline would break the .gitignore entry DVC writes, leaving the data one `git add .` from git
        raise UsageError(f"{args.path!r}: file name has control characters {bad!r}: rename the file first")
    code, info = add_data(args.path, args.kind, args.allow_quarantine, dvc=not args.no_dvc)
    if code:
        print(f"error: {info['error']}", file=sys.stderr)
        return code
    print(f"added {info['path']} as {info['kind']} ({info['rows']} rows, format {info['format']})")
    if info["dvc_file"]:
        print(f"versioned by DVC: {info['dvc_file']} (commit it with git; `dvc push` stores the data)")
    from flows.events import EVENT_DATA_ADDED, emit_data_event
    event = None if args.no_event else emit_data_event(Path(info["path"]), info["kind"], info["sha256"], info["rows"],
                                                       Path(info["root"]))
    print(f"event {EVENT_DATA_ADDED}: " + (event or ("not emitted (--no-event)" if args.no_event else
                                                       "not emitted (no Prefect server: set PREFECT_API_URL)")))
    return EXIT_OK


def cmd_check(args) -> int:
    """`lmsys check`: the preflight table (lmsys/check.py); exit 0 ok, 1 warnings, 2 a check failed.
    --build-kernels first builds gptqmodel's Marlin kernels here (lmsys.kernels.build_marlin), outside
    any step, and prints the time; a failed build is exit 2."""
    from lmsys.check import main_check
    if args.build_kernels:
        from lmsys.kernels import FAIL, build_marlin
        status, detail, fix = build_marlin()
        print(f"{status:<4}  build kernels: {detail}" + (f"\n      fix: {fix}" if fix else ""))
        if status == FAIL:
            return EXIT_INPUT
    cfg = _config(args)
    runner = args.runner or cfg["orchestration"]["runner"]
    api_url = None
    if runner == "slurm":                       # the Prefect API the jobs must reach (env or Prefect profile)
        from flows.runners import prefect_api_url
        api_url = prefect_api_url()
    return main_check(cfg, runner, api_url)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, help="default: params.yaml's profile")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. train_teacher.lr=1e-4")
    p.add_argument("--params", help="params file (default: the repo's params.yaml)")


def cmd_config(args) -> int:
    """`lmsys config [--profile P] [--set K=V ...] [KEY ...]`: the resolved configuration as YAML, or for
    each KEY its value and every layer that sets it (params.yaml, profiles.<P>, --set), the last winning."""
    import yaml

    from lmsys.config import explain
    overrides = dict(parse_override(o) for o in (args.set or []))
    if not args.keys:
        cfg = load_config(args.profile, overrides, args.params)
        print(f"# resolved configuration of profile {cfg['profile']} (params.yaml, profiles.{cfg['profile']}"
              + (", --set" if overrides else "") + "); `lmsys config KEY` says where a value comes from")
        print(yaml.safe_dump(cfg, sort_keys=False, width=120).rstrip())
        return EXIT_OK
    load_config(args.profile, overrides, args.params)          # the whole config must be valid first
    for key in args.keys:
        print("\n".join(explain(key, args.profile, overrides, args.params)))
    return EXIT_OK


def _add_root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="the run's root the step reads and writes (data/, artifacts/, reports/; "
                                  "default: the repo), held on its lease while the step runs")


def cmd_steps(args) -> int:
    """`lmsys steps`: the recipe table, numbered, in order."""
    from lmsys.steps.recipe import format_recipe
    print(format_recipe())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from lmsys.steps.recipe import STEPS
    ap = argparse.ArgumentParser(prog="lmsys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error (also anywhere after the command)")
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
    _add_root_arg(p)
    p.set_defaults(func=cmd_folds, step="folds")

    p = sub.add_parser("convert-ut", help="the public UltraFeedback release (openbmb or binarized) -> competition format")
    p.add_argument("path", help="json, jsonl or parquet of openbmb/UltraFeedback or ultrafeedback_binarized")
    p.add_argument("--out", required=True, help="csv or parquet in the Kaggle train.csv columns (data.ut)")
    p.add_argument("--tie-margin", type=float, default=0.0, help="score difference at or below which a pair is a tie")
    p.set_defaults(func=cmd_convert_ut)

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
    p.add_argument("--method", choices=("vector", "temperature"),
                   help="fit: default vector; apply: must match the params file's method when given")
    p.add_argument("--model", help="pipeline step: the teacher to calibrate")
    _add_config_args(p)
    _add_root_arg(p)
    p.set_defaults(func=cmd_calibrate, step="calibrate")

    p = sub.add_parser("predict", help="steps 8/8.5: submission for a test CSV (TTA), or the pipeline step without --test")
    p.add_argument("--test", help="Kaggle test.csv")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--model", help="model dir or exported bundle (default: the last pipeline run's final model)")
    p.add_argument("--no-tta", action="store_true", help="original order only")
    _add_config_args(p)
    _add_root_arg(p)
    p.set_defaults(func=cmd_predict, step="predict")

    p = sub.add_parser("export", help="the final model, its text/TTA/serving settings, a manifest and the wheels a stock "
                                      "Kaggle image lacks, as one bundle that `lmsys predict --model DIR` runs offline")
    p.add_argument("--out", required=True, help="the bundle's directory (replaced whole)")
    p.add_argument("--model", help="model dir (default: the last pipeline run's final model)")
    p.add_argument("--root", help="the pipeline run's root (default: the repo)")
    p.add_argument("--wheel", action="append", metavar="DIST", help="also bundle this installed distribution's wheel")
    p.add_argument("--no-wheels", action="store_true", help="leave the wheels out")
    _add_config_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="step 9: log loss / accuracy / ECE of a predictions CSV, or the pipeline step")
    p.add_argument("--preds")
    p.add_argument("--labels", help="id + label, or id + the three winner columns (default: the preds file's label column)")
    p.add_argument("--bins", type=int, default=15)
    _add_config_args(p)
    _add_root_arg(p)
    p.set_defaults(func=cmd_evaluate, step="evaluate")

    for name, step in STEPS.items():
        if name in ("folds", "demo-data", "calibrate", "predict", "evaluate"):
            continue
        doc = (step.run.__doc__ or name).strip().splitlines()[0].replace("%", "%%")
        p = sub.add_parser(name, help=f"pipeline step {step.number}: {doc}")
        _add_config_args(p)
        _add_root_arg(p)
        if "fold" in step.fan_out:
            p.add_argument("--fold", type=int, required=True)
        if "model" in step.fan_out:
            p.add_argument("--model", required=True)
        p.set_defaults(func=cmd_step, step=name)

    from stages import lineage                  # dvc.yaml, dvc.lock, data add (stages/lineage.py)
    p = sub.add_parser("config", help="the resolved configuration, or where each KEY's value comes from")
    _add_config_args(p)
    p.add_argument("keys", nargs="*", metavar="KEY", help="dotted keys (e.g. distill.lr) or sections (distill)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("steps", help="the recipe: every step with its number, in order")
    p.set_defaults(func=cmd_steps)
    p = sub.add_parser("step", help="run any recipe step by name (e.g. `step demo-data`, as dvc.yaml does)")
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--fold", type=int)
    p.add_argument("--model")
    _add_config_args(p)
    _add_root_arg(p)
    p.set_defaults(func=cmd_step)
    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the recipe table (--check: exit 1 when stale)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--profile", choices=PROFILES, help="default: params.yaml's profile")
    p.add_argument("--out", help="write here instead of the repo's dvc.yaml")
    p.set_defaults(func=lineage.cmd_dvc_yaml)
    p = sub.add_parser("data", help="`data add FILE`: validate, copy into data/added/, dvc add, emit lmsys.data.added")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("add", help="add a data file (exit 1 when rows are quarantined, 2 when unusable)")
    p.add_argument("path")
    p.add_argument("--as", dest="kind", default="auto", choices=("auto", *lineage.KINDS),
                   help="table it feeds (auto: test when unlabelled, else external; UT data in the competition's "
                        "columns needs --as ut: the format comes from the columns, never the file name)")
    p.add_argument("--allow-quarantine", action="store_true", help="add it even when some rows are quarantined")
    p.add_argument("--no-event", action="store_true", help="do not emit the Prefect event")
    p.add_argument("--no-dvc", action="store_true", help="do not `dvc add` it")
    p.set_defaults(func=cmd_data_add)

    p = sub.add_parser("run", help="the whole pipeline as a Prefect flow")
    _add_config_args(p)
    p.add_argument("--runner", choices=RUNNERS)
    p.add_argument("--root", help="where data/, artifacts/ and reports/ go (default: the repo)")
    p.add_argument("--verbose", dest="run_verbose", action="store_true",
                   help="Prefect's INFO lines and the steps' progress bars on the console too")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ablate", help="the recipe's options (calibration, TTA, ensemble method, information-gain "
                                      "weights, post-pretraining) each against the default: a table of paired log-loss differences")
    _add_config_args(p)
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="these variants only (default: all; `lmsys ablate --list`)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--runner", choices=RUNNERS)
    p.add_argument("--root", help="where the runs go, one root each (default: ablations/<profile>)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("check", help="preflight: models, data, runner, disk; exit 0 ok, 1 warnings, 2 a check failed")
    _add_config_args(p)
    p.add_argument("--runner", choices=RUNNERS, help="default: orchestration.runner")
    p.add_argument("--root", help="the run's root (artifacts, demo data; default: the repo)")
    p.add_argument("--build-kernels", action="store_true",
                   help="first build gptqmodel's Marlin kernels here (needs a GPU and nvcc; minutes, once), so "
                        "quantize.backend auto may use them; steps never compile")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="every task with its job, timeout, estimated wall time and GPU-hours, and the "
                                    "critical path on N GPUs (nothing runs)")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, help="GPUs to schedule the GPU tasks on (default 1; with runner local-gpus: "
                                            "its devices, orchestration.local_gpus)")
    p.add_argument("--runner", choices=RUNNERS, help="schedule as this runner runs (default: orchestration.runner; "
                                                     "local-gpus: on its workers' device groups, no SLURM jobs)")
    p.add_argument("--card", help="price on this card (a key of orchestration.estimate.cards, e.g. h200, h100, a100-80g): "
                                  "the figures rescaled by sustained bf16 throughput")
    p.add_argument("--serve-cards", help="also estimate predict on this card set, e.g. 2xT4 (unmeasured: derived)")
    p.add_argument("--test-rows", type=int, help="test rows of the serving estimate (default: the run's test rows)")
    p.add_argument("--root", help="the run's root (its prepared tables give the row counts when they exist)")
    p.set_defaults(func=cmd_plan)
    return ap


def cmd_plan(args) -> int:
    from lmsys.plan import cmd_plan as run_plan
    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command; returns its exit code (module docstring). Bad input and internal
    errors become one `error:` line on stderr (exit 2 / 3); `--debug` or LMSYS_DEBUG=1 adds the
    traceback. Usage errors exit 2 through argparse."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LMSYS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = None
    with _sigterm_raises():
        try:
            args = build_parser().parse_args(argv)
            if not args.verbose and args.func not in (cmd_run, cmd_ablate):   # those two quiet their own console
                from lmsys.console import quiet_console
                quiet_console(progress_bars=sys.stderr.isatty())   # before torch is imported; bars only on a terminal
            from tasks.secrets import use_prefect_secret
            use_prefect_secret()                # hf_token() may fall back on the Prefect Secret block
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            return args.func(args)
        except (KeyboardInterrupt, Terminated) as e:
            return _stopped(e, debug)
        except INPUT_ERRORS as e:
            return _error(e, EXIT_INPUT, debug)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                return _disk_error(e, args, debug)
            return _error(e, EXIT_INTERNAL, debug)
        except Exception as e:  # noqa: BLE001 - the one place that turns any failure into an exit code
            return _error(e, EXIT_INTERNAL, debug)


class Terminated(BaseException):
    """SIGTERM (what `timeout`, `kill` and SLURM's `scancel` send first), raised like KeyboardInterrupt."""


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated in the main thread for the block (a flow run puts Prefect's handler,
    and flows.interrupt's, in front of it while it runs, and passes the signal on)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)
    before = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _stopped(e: BaseException, debug: bool) -> int:
    """Ctrl-C -> exit 130, SIGTERM -> 143 (128 + the signal, as a shell reports a process killed by
    it), with one line: what finished is kept, a rerun resumes."""
    from flows.interrupt import message
    if debug:
        traceback.print_exc()
    signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
    print(message(signum), file=sys.stderr, flush=True)
    return 128 + signum


def _disk_error(e: OSError, args, debug: bool) -> int:
    """A full disk (exit 3: the machine) or a read-only one (exit 2: a --root or --out to change), in
    one line naming the file (lmsys.io.NoSpace names it where the OS error does not)."""
    if debug:
        traceback.print_exc()
    if e.errno == errno.EROFS:
        print(f"error: {e.filename or getattr(args, 'root', None) or 'the output'}: read-only file system: "
              "use a writable --root / --out", file=sys.stderr)
        return EXIT_INPUT
    where = e.filename or f"a file under {getattr(args, 'root', None) or 'the repo'}"
    text = str(e) if e.filename and where in str(e) else f"no space left on the device writing {where} ({e.strerror})"
    print(f"error: {text}", file=sys.stderr)
    return EXIT_INTERNAL


def _error(e: BaseException, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(str(text).split()) or type(e).__name__
    if code == EXIT_INTERNAL:
        text = f"internal error ({type(e).__name__}): {text}" + ("" if debug else " (rerun with --debug for the traceback)")
    print(f"error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
