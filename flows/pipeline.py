"""The pipeline flow: the recipe table's tasks (lmsys.steps.recipe), folds and teachers fanned out.

Every task starts as soon as the tasks that write its inputs have finished (graph(cfg): its
upstream futures are passed as wait_for), never waiting for a whole level: a slow fold delays only
what reads it. A finished cache hit whose outputs no longer carry its key is rerun with
refresh_cache before anything downstream starts. Optional steps follow params.yaml
(calibrate.enabled, quantize.enabled, evaluate.enabled; the flow's `overrides` set them).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.futures import PrefectFuture
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from flows.check import preflight
from flows.console import Progress, previous_seconds
from flows.interrupt import stop_on_signal
from flows.lease import hold_root
from flows.runners import (CPU_RESOURCE, DASK_RUNNERS, check_slurm, gpu_worker_name, is_dask, make_task_runner,
                           wait_any)
from tasks.secrets import use_prefect_secret
from lmsys.config import ProfileName, load_config
from lmsys.data.crosscheck import skips_predict
from lmsys.distributed import step_width
from lmsys.io import write_json
from lmsys.paths import Layout
from lmsys.plan import local_gpu_layout, step_timeout
from lmsys.schedule import DevicePool
from lmsys.steps.recipe import STEPS, graph, tasks_of, task_label
from tasks.steps import cached_here, outputs_match, run_step

# Seconds between updates of the progress artifact (one API call each); the last task always updates it.
PROGRESS_EVERY_S = 5.0
DATA = ("train", "test", "external", "ut")      # the flow's data parameters: data.<name> overrides


def _task(name: str, cfg: dict, keys: dict, refresh: bool):
    """The Prefect task of one step and its keys: its name, retries and timeout."""
    o = cfg["orchestration"]
    return run_step.with_options(name=task_label(name, keys), retries=o["retries"], retry_delay_seconds=o["retry_delay_s"],
                                 timeout_seconds=step_timeout(cfg, name) if o["runner"] in DASK_RUNNERS else None,
                                 refresh_cache=refresh)   # a local thread cannot be stopped: Prefect only warns


def _submit(name: str, cfg: dict, keys: dict, refresh: bool, wait_for: list, devices: tuple[str, ...] | None = None):
    """Submit one task. On the local-gpus runner a GPU task goes to the worker of `devices`, the
    group of GPUs the Scheduler took for it; CPU steps go to CPU-only workers there and on SLURM
    with cpu_jobs."""
    import dask
    o = cfg["orchestration"]
    t = _task(name, cfg, keys, refresh)
    if devices is not None:                              # local-gpus: that group's worker and no other
        with dask.annotate(workers=[gpu_worker_name(devices)], allow_other_workers=False,
                           resources={"GPU": len(devices)}):
            return t.submit(name, cfg, keys, wait_for=wait_for)
    if STEPS[name].gpu and o["runner"] == "slurm":
        # only GPU workers take it; a data-parallel step holds the GPUs its ranks use (at most a job's)
        gpus = max(1, min(step_width(cfg, name), int(o["slurm"]["gpus_per_job"])))
        with dask.annotate(resources={"GPU": gpus}):
            return t.submit(name, cfg, keys, wait_for=wait_for)
    if o["runner"] == "local-gpus" or (o["runner"] == "slurm" and int(o["slurm"].get("cpu_jobs") or 0)):
        with dask.annotate(resources={CPU_RESOURCE: 1}):  # CPU steps on the CPU-only workers
            return t.submit(name, cfg, keys, wait_for=wait_for)
    return t.submit(name, cfg, keys, wait_for=wait_for)


class Finished(PrefectFuture):
    """A task the flow ran in its own process (a predicted cache hit), answering as a finished Prefect
    future: the tasks downstream take it in wait_for like any other (Prefect's wait() reads _final_state)."""
    wrapped_future = None

    def __init__(self, state):
        self._final_state = state
        self._task_run_id = state.state_details.task_run_id

    @property
    def task_run_id(self):
        return self._task_run_id

    @property
    def state(self):
        return self._final_state

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None, raise_on_failure: bool = True):
        return self._final_state.result(raise_on_failure=raise_on_failure)

    def add_done_callback(self, fn) -> None:
        fn(self)


class Scheduler:
    """Submits each task of the run once the tasks that write its inputs have finished, and keeps
    one record per task (state, where and when it ran) in the order the tasks finished. A task whose
    cache hit is certain beforehand (tasks.steps.cached_here) runs in the flow's process instead: a
    rerun with nothing changed sends no task to a worker, so it starts no SLURM job.

    On the local-gpus runner a ready GPU task also waits for a free device group of its width
    (lmsys.schedule.DevicePool over the runner's workers' groups, as `lmsys plan` schedules them):
    it holds the group until it finishes, so overlapping workers never share a device."""

    def __init__(self, cfg: dict, task_runner, console: Progress | None = None):
        self.cfg, self.task_runner, self.console = cfg, task_runner, console
        self.tasks = {task_label(n, k): (n, k) for n, k in tasks_of(cfg)}
        self.deps = graph(cfg)
        self.waiting = list(self.tasks)             # table order: the order ready tasks are submitted in
        self.running: dict = {}
        self.done: dict = {}                        # label -> its finished future (its final state on Dask)
        self.refreshed: set[str] = set()
        self.records: dict[str, dict] = {}
        self.pool = DevicePool(local_gpu_layout(cfg)) if cfg["orchestration"]["runner"] == "local-gpus" else None
        self.held: dict[str, tuple[str, ...]] = {}  # label -> the device group a running task holds

    def submit_ready(self) -> None:
        layout = Layout.of(self.cfg)
        for t in [t for t in self.waiting if all(d in self.records for d in self.deps[t])]:
            n, k = self.tasks[t]
            if cached_here(self.cfg, n, k):         # a certain hit: run here, no worker needed
                self.waiting.remove(t)
                task = _task(n, self.cfg, k, refresh=False)
                self.running[t] = Finished(task(n, self.cfg, k, return_state=True, wait_for=self.upstream(t)))
                continue
            if self.pool is not None and STEPS[n].gpu:
                group = self.pool.take(min(step_width(self.cfg, n), len(self.pool.devices)))
                if group is None:                   # every group of its width has a busy device: wait
                    continue
                self.held[t] = group
            self.waiting.remove(t)
            missing = not all(Path(p).exists() for p in STEPS[n].outputs(self.cfg, layout, **k))
            self.running[t] = _submit(n, self.cfg, k, refresh=missing, wait_for=self.upstream(t),
                                      devices=self.held.get(t))

    def upstream(self, label: str) -> list:
        """wait_for of a task: its finished upstream tasks (the graph in Prefect's records)."""
        return [self.done[d] for d in self.deps[label]]

    def collect(self, label: str) -> dict | None:
        """The record of a finished task, or None when it was a stale cache hit (resubmitted)."""
        n, k = self.tasks[label]
        fut = self.running.pop(label)
        res, state = fut.result(), fut.state.name
        if state == "Cached" and not outputs_match(self.cfg, n, k, res["key"]):
            get_run_logger().warning("%s: cache hit but its outputs were replaced since; rerunning", label)
            self.refreshed.add(label)
            self.running[label] = _submit(n, self.cfg, k, refresh=True, wait_for=self.upstream(label),
                                          devices=self.held.get(label))     # on the group it holds
            return None
        if label in self.held:
            self.pool.release(self.held.pop(label))
        # On Dask keep the final state, never the future: a held Dask future pins its result on the worker,
        # and a worker job that goes (scancel) makes Dask recompute it, although its outputs are on disk
        if is_dask(self.task_runner):
            self.done[label] = fut.state
            if fut.wrapped_future is not None:
                fut.wrapped_future.release()          # the result stays on disk and in Prefect, not on a worker
        else:
            self.done[label] = fut
        state = "Completed (refreshed)" if label in self.refreshed else state
        return {"task": label, "step": n, "gpu": STEPS[n].gpu, "state": state,
                **{x: res.get(x) for x in ("host", "slurm_job_id", "worker", "cuda_visible_devices", "pid", "started",
                                           "seconds", "finished", "key", "outputs", "metrics")}}

    def run(self, on_done=lambda: None) -> list[dict]:
        """Run every task; `on_done()` after each batch of finished tasks. Returns the records in plan order."""
        self.submit_ready()
        while self.running:
            finished = [r for r in map(self.collect, wait_any(self.running, self.cfg, self.task_runner)) if r]
            for rec in sorted(finished, key=lambda r: r["finished"] or 0):
                self.records[rec["task"]] = rec
                if self.console is not None:
                    self.console.task_done(rec["task"], rec["state"], rec["seconds"] if rec["state"] != "Cached" else 0.0)
            if self.console is not None:
                self.console.report()
            on_done()
            self.submit_ready()
        return [self.records[t] for t in self.tasks]


@flow(name="lmsys-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(profile: ProfileName = "tiny",
             train: str | None = None, test: str | None = None,
             external: list[str] | None = None, ut: str | None = None,
             overrides: dict | None = None, root: str | None = None, check: bool = True) -> dict:
    """Run the whole recipe. Data defaults to the embedded demo (train=None); `overrides` are dotted
    params.yaml keys (e.g. folds.use, models.teachers, calibrate.enabled, orchestration.runner);
    `root` is where data/, artifacts/ and reports/ go. The task runner is the flow's (run_pipeline
    picks it from orchestration.runner); started with the decorator's thread runner and runner slurm
    or local-gpus (a deployment run from the UI), the flow runs itself, with the same parameters, as a
    subflow on that runner's Dask workers. `check` runs `lmsys check` first (flows/check.py): a failed check stops
    the flow before any step."""
    params = dict(locals())                     # the flow's parameters, as given: the subflow reuses them
    cfg = flow_config(**params)
    logger = get_run_logger()
    flow_run_id = str(FlowRunContext.get().flow_run.id)
    # the root's lease for the whole run (deployment runs too; within `lmsys run` the CLI's lease, now
    # naming this flow run), and Ctrl-C / SIGTERM that stop the local workers before Prefect unwinds
    with hold_root(Layout.of(cfg).root, flow_run_id, logger.warning) as held, stop_on_signal(flow_run_id):
        return _pipeline(params, cfg, held)


def _pipeline(params: dict, cfg: dict, held) -> dict:
    """The flow's body, with the root's lease `held` (checked after each batch of finished tasks)."""
    logger = get_run_logger()
    use_prefect_secret()
    task_runner = FlowRunContext.get().task_runner
    runner = cfg["orchestration"]["runner"]
    if runner == "slurm":                       # settings no worker could run: before any job, the check's too
        check_slurm(cfg, [task_label(n, k) for n, k in tasks_of(cfg) if STEPS[n].gpu])
    if params["check"]:
        preflight(cfg)                          # raises PreflightFailed when a check fails; cached otherwise
    if runner in DASK_RUNNERS and not is_dask(task_runner):
        logger.info("runner %s: running the pipeline as a subflow on its Dask workers", runner)
        return pipeline.with_options(task_runner=make_task_runner(cfg, runner))(**{**params, "check": False})
    from lmsys.revision import git_rev
    code_rev = git_rev()                        # the code this run runs: read before it writes anything
    labels = [task_label(n, k) for n, k in tasks_of(cfg)]
    console = Progress(labels, previous_seconds(Layout.of(cfg).art / "flow_run.json"), logger)
    progress = create_progress_artifact(0.0, key="lmsys-progress", description="pipeline tasks done (%)")
    sched, t0, last = Scheduler(cfg, task_runner, console), time.perf_counter(), [time.perf_counter()]

    def report_progress():
        held.check()                            # LeaseLost: another process took the root over
        if time.perf_counter() - last[0] >= PROGRESS_EVERY_S or len(sched.records) == len(labels):
            update_progress_artifact(progress, 100.0 * len(sched.records) / len(labels))
            last[0] = time.perf_counter()
    records = sched.run(report_progress)
    return _finish(cfg, tasks_of(cfg), records, time.perf_counter() - t0, code_rev)


def flow_config(profile: str | None = "tiny", overrides: dict | None = None, root: str | None = None, **params) -> dict:
    """The resolved config of the flow's parameters: `overrides`, then the data paths as data.<name>
    (train, test, external, ut), then `root`. Other flow parameters (check) do not enter it."""
    over = {**(overrides or {}), **{f"data.{k}": params[k] for k in DATA if params.get(k) is not None}}
    cfg = load_config(profile, over)
    if root:
        cfg["root"] = str(root)
    return cfg


def _finish(cfg: dict, tasks: list[tuple[str, dict]], records: list[dict], seconds: float, code_rev: str) -> dict:
    """Record the run (flow_run.json, dvc.lock, the data record) and publish its artifacts; the summary."""
    layout = Layout.of(cfg)
    ctx = FlowRunContext.get()
    from stages.lineage import lineage_markdown, record_flow_run, stage_name   # dvc.lock entries + data record
    summary = {"profile": cfg["profile"], "git_rev": code_rev, "seconds": seconds,
               "runner": cfg["orchestration"]["runner"], "flow_run_id": str(ctx.flow_run.id) if ctx else None,
               "tasks": len(records), "cached": sum(r["state"] == "Cached" for r in records),
               "submission": str(layout.submission), "report": str(layout.reports / "report.md"),
               "records": records}
    cached = {stage_name(n, k) for (n, k), r in zip(tasks, records) if r["state"] == "Cached"}
    lineage = record_flow_run(cfg, tasks, cached)
    summary["dvc"] = {"stages": lineage["stages"], "note": lineage["note"], "git_rev": lineage["git_rev"]}
    write_json(summary, layout.art / "flow_run.json")
    create_markdown_artifact(lineage_markdown(lineage, summary.get("flow_run_id")), key="lmsys-lineage",
                             description=f"git {lineage['git_rev'][:12]} and the dvc.lock hashes this run produced")
    create_table_artifact(
        [{"task": r["task"], "state": r["state"], "host": r["host"], "slurm_job_id": r["slurm_job_id"] or "",
          "worker": r.get("worker") or "", "seconds": round(r["seconds"] or 0, 2)} for r in records],
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


def run_pipeline(runner: str | None = None, **params) -> dict:
    """The flow (its parameters: `params`; profile None = params.yaml's) on the task runner of
    orchestration.runner, which `runner` overrides. The config is resolved here, once: the flow gets
    the same resolution (lmsys.config.load_config keeps it for the process). Returns the flow's summary."""
    if runner:
        params["overrides"] = {**(params.get("overrides") or {}), "orchestration.runner": runner}
    cfg = flow_config(**params)
    params["profile"] = cfg["profile"]
    return pipeline.with_options(task_runner=make_task_runner(cfg))(**params)


def run_from_cli(args) -> int:
    """`lmsys run`: the flow with the CLI's profile / runner / --set overrides."""
    from lmsys.config import parse_override
    if getattr(args, "params", None):
        raise ValueError("lmsys run reads the repo's params.yaml (the flow's workers must see the same file): "
                         f"--params {args.params} is not taken; change values with --set KEY=VALUE")
    overrides = dict(parse_override(o) for o in (args.set or []))
    out = run_pipeline(profile=args.profile, runner=args.runner, overrides=overrides, root=args.root)
    cfg = load_config(args.profile, overrides)                  # the run's own resolution (kept by load_config)
    print(f"pipeline done in {out['seconds']:.1f} s: {out['tasks']} tasks, {out['cached']} cached")
    print(f"submission: {'none (data.test: none)' if skips_predict(cfg) else out['submission']}")
    print(f"report:     {out['report']}")
    return 0
