"""Task runners: `local` (threads in this process, default one at a time: the steps seed torch's
global RNG, so parallel threads would break determinism) and `slurm` (dask-jobqueue SLURMCluster
through prefect-dask: each worker is one SLURM job with --gres=gpu:N and the Dask resource GPU=N)."""
from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner


def make_task_runner(cfg: dict, runner: str | None = None):
    runner = runner or cfg["orchestration"]["runner"]
    if runner == "local":
        return ThreadPoolTaskRunner(max_workers=int(cfg["orchestration"].get("local_workers", 1)))
    if runner == "slurm":
        return slurm_task_runner(cfg["orchestration"]["slurm"])
    raise ValueError(f"unknown runner {runner!r}; choose local or slurm")


def slurm_cluster_kwargs(s: dict) -> dict:
    """SLURMCluster arguments from params.yaml's orchestration.slurm."""
    gpus = int(s["gpus_per_job"])
    kw = {"queue": s["queue"], "account": s["account"], "walltime": s["walltime"], "memory": s["memory"],
          "cores": int(s["cores"]), "processes": int(s["processes"]), "job_script_prologue": list(s["prologue"]),
          "job_extra_directives": [f"--gres=gpu:{gpus}"] if gpus else [],
          "worker_extra_args": ["--resources", f"GPU={gpus}"] if gpus else []}
    if s.get("interface"):
        kw["interface"] = s["interface"]
    return {k: v for k, v in kw.items() if v is not None}


def slurm_task_runner(s: dict):
    from prefect_dask import DaskTaskRunner
    return DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs=slurm_cluster_kwargs(s),
                          adapt_kwargs={"minimum": int(s["min_jobs"]), "maximum": int(s["max_jobs"])})
