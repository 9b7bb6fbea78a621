"""SLURMCluster plus fixed CPU-only jobs (orchestration.slurm.cpu_jobs): SLURM jobs without --gres
whose Dask worker offers no GPU resource, so only CPU steps can run there (GPU steps are annotated
resources={"GPU": 1} in flows/pipeline.py). They are started with the cluster, outside adaptive
scaling (which manages the GPU jobs), and scancelled when it closes."""
from __future__ import annotations

from dask_jobqueue import SLURMCluster


def cpu_only(job_kwargs: dict) -> dict:
    """The job arguments of the GPU jobs without the GPU: no --gres directive, no GPU worker resource."""
    extra = [d for d in job_kwargs.get("job_extra_directives") or [] if not d.startswith("--gres")]
    args, worker_args = list(job_kwargs.get("worker_extra_args") or []), []
    while args:
        a = args.pop(0)
        if a == "--resources" and args and args[0].startswith("GPU="):
            args.pop(0)
        else:
            worker_args.append(a)
    return {**job_kwargs, "job_extra_directives": extra, "worker_extra_args": worker_args}


def cpu_job_options(job_kwargs: dict, template: dict) -> dict:
    """The CPU-only job's arguments: cpu_only(job_kwargs) with the CPU template's queue, walltime, memory
    and cores, and the worker resource CPU_JOB=1 that CPU steps ask for (flows.pipeline._submit)."""
    opts = {**cpu_only(job_kwargs), **template}
    return {**opts, "worker_extra_args": [*opts["worker_extra_args"], "--resources", "CPU_JOB=1"]}


class SLURMClusterWithCpuJobs(SLURMCluster):
    """A dask_jobqueue.SLURMCluster that also keeps `cpu_jobs` CPU-only worker jobs (names cpu-0, ...)."""

    cpu_jobs_wanted, cpu_jobs = 0, ()           # (also for an instance whose __init__ did not finish)

    def __init__(self, *args, cpu_jobs: int = 0, cpu_job: dict | None = None, **kwargs):
        self.cpu_jobs_wanted, self.cpu_jobs = int(cpu_jobs), []     # before __init__, which may start it
        self.cpu_job = dict(cpu_job or {})     # the CPU job template's queue/walltime/memory/cores (flows.runners)
        super().__init__(*args, **kwargs)

    async def _start(self):
        await super()._start()
        opts = cpu_job_options(self._job_kwargs, self.cpu_job)
        for i in range(self.cpu_jobs_wanted):
            job = self.job_cls(self.scheduler.address, name=f"cpu-{i}", **opts)
            await job                                  # sbatch
            self.cpu_jobs.append(job)

    async def _close(self):
        for job in self.cpu_jobs:
            await job.close()                          # scancel
        self.cpu_jobs = []
        await super()._close()
