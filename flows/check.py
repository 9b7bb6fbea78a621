"""The flow's first task: `lmsys check` (lmsys/check.py) before any step.

Its table goes to the Prefect table artifact `lmsys-check`. A failed check raises PreflightFailed,
so the flow stops before any data or training step; warnings are logged and the flow goes on.
The result is cached on lmsys.check.fingerprint (what the checks read: model specs and sources, data
files or demo parameters, runner settings, the check's code), so a rerun with nothing changed does not
repeat it; a failed check is never cached.
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext

from flows.runners import is_dask, prefect_api_url
from lmsys import check, check_table


class PreflightFailed(RuntimeError):
    """A check of `lmsys check` failed: the message names every failed line."""


def _key(context: TaskRunContext, parameters: dict) -> str:
    cfg = parameters["cfg"]
    return "lmsys-check-" + check.fingerprint(cfg, cfg["orchestration"]["runner"], prefect_api_url())


def _on_dask_worker(cfg: dict):
    """in_job for lmsys.check.run_checks when the flow already runs on its SLURM Dask cluster (whose
    jobs hold the nodes): the job part goes to a GPU worker of that cluster instead of a new job."""
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    client = runner.client if is_dask(runner) else None
    if client is None:
        return None
    s = cfg["orchestration"]["slurm"]

    def in_job(names, rows, api_url):
        fut = client.submit(check.job_checks, cfg, names, rows, api_url, pure=False,
                            resources={"GPU": 1} if int(s["gpus_per_job"]) else None)
        return fut.result(timeout=float(s["worker_wait_s"]) + 600)
    return in_job


@task(name="check", cache_key_fn=_key, persist_result=True, retries=0)
def preflight(cfg: dict) -> dict:
    """Run every check for the flow's profile and runner; raise PreflightFailed when one fails."""
    logger = get_run_logger()
    runner = cfg["orchestration"]["runner"]
    checks = check.run_checks(cfg, runner, prefect_api_url() if runner == "slurm" else None, progress=logger.info,
                          in_job=_on_dask_worker(cfg))
    code = check_table.exit_code(checks)
    create_table_artifact(check_table.table_rows(checks), key="lmsys-check",
                          description=f"lmsys check --profile {cfg['profile']} --runner {runner}: {check_table.summary(checks)}")
    logger.info("lmsys check: %s\n%s", check_table.summary(checks), check_table.format_table(checks))
    if code == 2:
        raise PreflightFailed("lmsys check failed, nothing was run: " + " | ".join(check_table.failures(checks)))
    return {"exit": code, "summary": check_table.summary(checks)}
