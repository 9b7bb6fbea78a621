"""The pipeline flow: the seed's step list, steps 0 -> 9, folds and teachers fanned out.

Each level of the graph is submitted at once (its tasks run in parallel on the task runner), then
checked: a cache hit whose outputs no longer carry its key is rerun with refresh_cache. Optional
steps follow params.yaml (calibrate.enabled, quantize.enabled, evaluate) unless the flow's
parameters say otherwise.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from flows.check import preflight
from flows.console import Progress, previous_seconds
from flows.runners import check_slurm, make_task_runner, wait_for_level
from lmsys.config import load_config
from lmsys.io import write_json
from lmsys.paths import Layout
from lmsys.plan import plan, step_timeout            # the task graph lives in the library (lmsys plan)
from tasks.steps import STEPS, outputs_match, run_step, task_label   # tasks.steps registers every step

# Seconds between updates of the progress artifact (one API call each): a level that finishes sooner
# (all cached, or a tiny step) is reported with the next one; the last level is always reported.
PROGRESS_EVERY_S = 5.0


def _submit(name: str, cfg: dict, keys: dict, refresh: bool):
    import dask
    o = cfg["orchestration"]
    t = run_step.with_options(name=task_label(name, keys), retries=o["retries"], retry_delay_seconds=o["retry_delay_s"],
                              timeout_seconds=step_timeout(cfg, name) if o["runner"] == "slurm" else None,
                              refresh_cache=refresh)   # a local thread cannot be stopped: Prefect only warns
    if STEPS[name].gpu and o["runner"] == "slurm":
        with dask.annotate(resources={"GPU": 1}):        # only GPU workers take it
            return t.submit(name, cfg, keys)
    if o["runner"] == "slurm" and int(o["slurm"].get("cpu_jobs") or 0):
        with dask.annotate(resources={"CPU_JOB": 1}):    # CPU steps on the CPU job template's workers
            return t.submit(name, cfg, keys)
    return t.submit(name, cfg, keys)


def _run_level(level, cfg: dict, task_runner=None, console: Progress | None = None) -> list[dict]:
    """Submit a level, wait, rerun stale cache hits; returns one record per task."""
    layout = Layout(cfg["profile"], cfg.get("root"))
    futures = [(n, k, _submit(n, cfg, k, refresh=not all(Path(p).exists() for p in STEPS[n].outputs(cfg, layout, **k))))
               for n, k in level]
    wait_for_level([f for _, _, f in futures], [task_label(n, k) for n, k, _ in futures], cfg, task_runner)
    records = []
    for n, k, fut in futures:
        res = fut.result()
        state = fut.state.name
        if state == "Cached" and not outputs_match(cfg, n, k, res["key"]):
            get_run_logger().warning("%s: cache hit but its outputs were replaced since; rerunning", task_label(n, k))
            fut = _submit(n, cfg, k, refresh=True)
            wait_for_level([fut], [task_label(n, k)], cfg, task_runner)
            res, state = fut.result(), "Completed (refreshed)"
        records.append({"task": task_label(n, k), "step": n, "gpu": STEPS[n].gpu, "state": state,
                        **{x: res.get(x) for x in ("host", "slurm_job_id", "pid", "started", "seconds", "finished",
                                                   "key", "outputs", "metrics")}})
    if console is not None:
        for r in sorted(records, key=lambda r: r["finished"] or 0):
            console.task_done(r["task"], r["state"], r["seconds"] if r["state"] != "Cached" else 0.0)
        console.report()
    return records


@flow(name="lmsys-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(profile: Literal["tiny", "small", "full", "gpu-smoke"] = "tiny",
             train: str | None = None, test: str | None = None,
             external: list[str] | None = None, ut: str | None = None,
             folds: list[int] | None = None, teachers: list[str] | None = None,
             calibrate: bool | None = None, quantize: bool | None = None, evaluate: bool = True,
             runner: Literal["local", "slurm"] | None = None,
             overrides: dict | None = None, root: str | None = None, check: bool = True) -> dict:
    """Run the whole recipe. Data defaults to the embedded demo (train=None); `folds`/`teachers` are
    the seed's TEACHER_FOLDS / SKIP_QWEN / INFER_MODELS; `overrides` are dotted params keys.
    The task runner is the flow's (see run_pipeline, which picks it from the runner); started with the
    decorator's thread runner and runner 'slurm' (a deployment run from the UI), the flow runs itself as
    a subflow on the SLURM Dask runner. `check` runs `lmsys check` first (flows/check.py): a failed check
    stops the flow before any step."""
    cfg = flow_config(profile, train, test, external, ut, folds, teachers, calibrate, quantize, evaluate, runner,
                      overrides, root)
    logger = get_run_logger()
    levels = plan(cfg)
    task_runner = FlowRunContext.get().task_runner
    if cfg["orchestration"]["runner"] == "slurm":      # settings no worker could run: before any job, the check's too
        check_slurm(cfg, [task_label(n, k) for lv in levels for n, k in lv if STEPS[n].gpu])
    if check:
        preflight(cfg)                          # raises PreflightFailed when a check fails; cached otherwise
    if cfg["orchestration"]["runner"] == "slurm":
        if type(task_runner).__name__ != "DaskTaskRunner":
            logger.info("runner slurm: running the pipeline as a subflow on SLURM workers")
            return pipeline.with_options(task_runner=make_task_runner(cfg, "slurm"))(
                profile=profile, train=train, test=test, external=external, ut=ut, folds=folds, teachers=teachers,
                calibrate=calibrate, quantize=quantize, evaluate=evaluate, runner=runner, overrides=overrides,
                root=root, check=False)
    from lmsys.lineage import git_rev
    code_rev = git_rev()                        # the code this run runs: read before it writes anything
    n_tasks, done, records = sum(map(len, levels)), 0, []
    progress = create_progress_artifact(0.0, key="lmsys-progress", description="pipeline tasks done (%)")
    t0 = last_update = time.perf_counter()
    console = Progress([task_label(n, k) for lv in levels for n, k in lv],
                       previous_seconds(Layout(cfg["profile"], cfg.get("root")).art / "flow_run.json"), logger)
    for i, level in enumerate(levels):
        logger.debug("running %s", ", ".join(task_label(n, k) for n, k in level))
        records += _run_level(level, cfg, task_runner, console)
        done += len(level)
        if time.perf_counter() - last_update >= PROGRESS_EVERY_S or i == len(levels) - 1:
            update_progress_artifact(progress, 100.0 * done / n_tasks)
            last_update = time.perf_counter()
    return _finish(cfg, levels, records, time.perf_counter() - t0, code_rev)


def flow_config(profile, train, test, external, ut, folds, teachers, calibrate, quantize, evaluate, runner,
                overrides, root) -> dict:
    over = dict(overrides or {})
    for key, value in (("data.train", train), ("data.test", test), ("data.external", external), ("data.ut", ut),
                       ("folds.use", folds), ("models.teachers", teachers), ("calibrate.enabled", calibrate),
                       ("quantize.enabled", quantize), ("orchestration.runner", runner)):
        if value is not None:
            over[key] = value
    cfg = load_config(profile, over)
    cfg["evaluate"]["enabled"] = evaluate and cfg["evaluate"]["enabled"]
    if root:
        cfg["root"] = str(root)
    return cfg


def _finish(cfg: dict, levels: list[list[tuple[str, dict]]], records: list[dict], seconds: float,
            code_rev: str) -> dict:
    layout = Layout(cfg["profile"], cfg.get("root"))
    ctx = FlowRunContext.get()
    from lmsys.lineage import lineage_markdown, record_flow_run, stage_name   # dvc.lock entries + data record
    summary = {"profile": cfg["profile"], "git_rev": code_rev, "seconds": seconds,
               "runner": cfg["orchestration"]["runner"], "flow_run_id": str(ctx.flow_run.id) if ctx else None,
               "tasks": len(records), "cached": sum(r["state"] == "Cached" for r in records),
               "submission": str(layout.submission), "report": str(layout.reports / "report.md"),
               "records": records}
    tasks = [t for level in levels for t in level]          # records come in this order
    cached = {stage_name(n, k) for (n, k), r in zip(tasks, records) if r["state"] == "Cached"}
    lineage = record_flow_run(cfg, tasks, cached)
    summary["dvc"] = {"stages": lineage["stages"], "note": lineage["note"], "git_rev": lineage["git_rev"]}
    write_json(summary, layout.art / "flow_run.json")
    create_markdown_artifact(lineage_markdown(lineage, summary.get("flow_run_id")), key="lmsys-lineage",
                             description=f"git {lineage['git_rev'][:12]} and the dvc.lock hashes this run produced")
    create_table_artifact(
        [{"task": r["task"], "state": r["state"], "host": r["host"], "slurm_job_id": r["slurm_job_id"] or "",
          "seconds": round(r["seconds"] or 0, 2)} for r in records],
        key="lmsys-tasks", description=f"tasks of this run (git {summary['git_rev'][:10]})")
    metrics = layout.reports / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        create_table_artifact([{"metric": k, "value": v} for k, v in m.items()], key="lmsys-metrics",
                              description="evaluation metrics (step 9)")
    report = layout.reports / "report.md"
    if report.exists():
        create_markdown_artifact(embed_images(report.read_text(), report.parent), key="lmsys-report",
                                 description=f"report at {report}")
    return {k: v for k, v in summary.items() if k != "records"}


def embed_images(markdown: str, base: Path) -> str:
    """The report's image links (relative file names, which the Prefect UI cannot resolve) as
    base64 data URIs, so the artifact page shows the plots themselves."""
    import base64
    import re

    def inline(m: re.Match) -> str:
        path = base / m.group(2)
        if not path.is_file() or path.suffix.lower() != ".png":
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, markdown)


def run_pipeline(profile: str = "tiny", runner: str | None = None, overrides: dict | None = None,
                 root: str | None = None, **params) -> dict:
    """The flow on the task runner that `runner` (default: orchestration.runner) names; the other
    arguments are the flow's parameters. Returns the flow's summary."""
    cfg = flow_config(profile, params.get("train"), params.get("test"), params.get("external"), params.get("ut"),
                      params.get("folds"), params.get("teachers"), params.get("calibrate"), params.get("quantize"),
                      params.get("evaluate", True), runner, overrides, root)
    runner = cfg["orchestration"]["runner"]
    flow_fn = pipeline.with_options(task_runner=make_task_runner(cfg, runner))
    return flow_fn(profile=profile, runner=runner, overrides=overrides, root=root, **params)


def run_from_cli(args) -> int:
    """`lmsys run`: the flow with the CLI's profile / runner / --set overrides."""
    from lmsys.config import parse_override
    if getattr(args, "params", None):
        raise SystemExit("lmsys run reads the repo's params.yaml (the flow's workers must see the same file); "
                         "change values with --set KEY=VALUE")
    overrides = dict(parse_override(o) for o in (args.set or []))
    cfg = load_config(args.profile, overrides)
    out = run_pipeline(profile=cfg["profile"], runner=args.runner, overrides=overrides, root=args.root)
    print(f"pipeline done in {out['seconds']:.1f} s: {out['tasks']} tasks, {out['cached']} cached")
    print(f"submission: {out['submission']}")
    print(f"report:     {out['report']}")
    return 0
