"""`lmsys ablate`: the recipe's options judged in one command (lmsys/ablations.py scores them).

The default configuration runs the whole pipeline in <root>/default; each variant (a few
params.yaml keys changed, lmsys.ablations.VARIANTS) then runs in <root>/<variant>, a copy of the
default's root made before its first run, so every task whose inputs, parameters and code the
variant leaves alone is a cache hit and only what it changes reruns (calibration-off: the students
onwards; tta-off: predict and evaluate). A variant root kept from an earlier call is reused as it is
(its own cache decides). The table (ablations.md, ablations.json in <root>, and a Prefect
markdown artifact) gives each variant's out-of-fold and test log loss with the paired difference
to the default and its bootstrap interval.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import flow_config, run_pipeline
import lmsys.ablations
from lmsys.paths import ROOT, Layout


def default_root(profile: str) -> Path:
    return ROOT / "ablations" / profile


def say(text: str) -> None:
    """The console (stdout, which the CLI's quiet console keeps) and the flow run's log in the UI."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    get_run_logger().info(text)


@flow(name="lmsys-ablations")
def ablations(profile: str = "tiny", overrides: dict | None = None, root: str | None = None,
              variants: list[str] | None = None, train: str | None = None, ut: str | None = None,
              runner: str | None = None) -> dict:
    """Run the default and each of `variants` (all of VARIANTS when None) on `profile` with
    `overrides` (and the data paths `train` / `ut`), under `root`; returns the scores by variant."""
    names = list(variants or lmsys.ablations.VARIANTS)
    unknown = [v for v in names if v not in lmsys.ablations.VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}: choose from {list(lmsys.ablations.VARIANTS)}")
    base = Path(root) if root else default_root(profile)
    data = {"train": train, "ut": ut}
    runs = {}
    for i, name in enumerate([lmsys.ablations.DEFAULT, *names]):
        extra = {} if name == lmsys.ablations.DEFAULT else lmsys.ablations.VARIANTS[name][1]
        over = {**(overrides or {}), **extra}
        where = base / name
        if name != lmsys.ablations.DEFAULT and not where.exists():
            shutil.copytree(base / lmsys.ablations.DEFAULT, where, symlinks=True)    # the default's outputs: cache hits
        say(f"== ablation {i + 1}/{len(names) + 1}: {name} "
              f"({', '.join(f'{k}={v}' for k, v in extra.items()) or 'the configuration as given'}) in {where}")
        out = run_pipeline(runner=runner, profile=profile, overrides=over, root=str(where), check=False, **data)
        say(f"== {name}: {out['tasks']} tasks, {out['cached']} cached, {out['seconds']:.0f} s")
        cfg = flow_config(profile=profile, overrides=over, root=str(where), **data)
        runs[name] = (cfg, Layout.of(cfg))
    from lmsys.steps.serve import known_test_labels
    results = lmsys.ablations.score(runs, known_test_labels(*runs[lmsys.ablations.DEFAULT]))
    sets = "".join(f" --set {k}={v if isinstance(v, str) else json.dumps(v)}"
                   for k, v in (overrides or {}).items())
    note = f"`lmsys ablate --profile {profile}{sets}`; the runs are under {base}."
    md = lmsys.ablations.write(results, base, f"Ablations, profile {profile}", note)
    create_markdown_artifact(md.read_text(), key="lmsys-ablations", description=f"ablations of profile {profile}")
    say(md.read_text())
    return results


def run_from_cli(args) -> int:
    """`lmsys ablate`: the flow with the CLI's profile, --set overrides, --only variants and --root."""
    from lmsys.config import load_config, parse_override
    overrides = dict(parse_override(o) for o in (args.set or []))
    cfg = load_config(args.profile, overrides)
    ablations(profile=cfg["profile"], overrides=overrides, root=args.root, variants=args.only,
              runner=args.runner)
    return 0
