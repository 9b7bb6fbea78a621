"""Task runners: `local` (threads in this process, default one at a time: the steps seed torch's
global RNG, so parallel threads would break determinism), `local-gpus` (one machine's GPUs without
SLURM: a Dask SpecCluster through prefect-dask, see local_gpu_task_runner) and `slurm` (dask-jobqueue
SLURMCluster through prefect-dask: each worker is one SLURM job with --gres=gpu:N and the Dask
resource GPU=N).

The slurm runner needs a Prefect API every process can reach (PREFECT_API_URL: a `prefect server
start`): without one each worker would start its own ephemeral API and the flow would never see
its tasks. The jobs get PREFECT_API_URL exported in their script (SLURM also exports the submitting
environment by default), this venv's python, and write their logs to artifacts/<profile>/slurm-logs.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect.task_runners import ThreadPoolTaskRunner

from lmsys.paths import Layout


def is_dask(task_runner) -> bool:
    """Is `task_runner` prefect-dask's DaskTaskRunner? (prefect_dask is imported by whoever made one, so a
    runner cannot be one while the module is not loaded: the local runner pays no Dask import for this.)"""
    module = sys.modules.get("prefect_dask")
    return module is not None and isinstance(task_runner, module.DaskTaskRunner)


# the Dask resource CPU steps ask for, offered by the CPU-only workers (SLURM cpu_jobs, local-gpus' CPU workers)
CPU_RESOURCE = "CPU_JOB"
DASK_RUNNERS = ("local-gpus", "slurm")


def make_task_runner(cfg: dict, runner: str | None = None):
    """`local`: one task at a time in this process (local_workers 1), or local_workers processes, each
    with one torch thread (the steps seed torch's global RNG, which threads would share; one thread per
    process keeps the numbers independent of which process ran a task). `local-gpus`: see
    local_gpu_task_runner. `slurm`: see slurm_task_runner."""
    runner = runner or cfg["orchestration"]["runner"]
    if runner == "local":
        n = int(cfg["orchestration"].get("local_workers", 1))
        if n > 1:
            quiet_resource_tracker()
            return local_worker_pool()(max_workers=n, initializer=local_worker_setup,
                                       initargs=(os.environ.get("TQDM_DISABLE") == "1",))
        return ThreadPoolTaskRunner(max_workers=1)
    if runner == "slurm":
        return slurm_task_runner(cfg)
    if runner == "local-gpus":
        return local_gpu_task_runner(cfg)
    raise ValueError(f"unknown runner {runner!r}; choose local, local-gpus or slurm")


def quiet_resource_tracker() -> None:
    """A run stopped by Ctrl-C or SIGTERM stops its workers (flows.interrupt) before the pool can
    close its queues' semaphores; multiprocessing's resource tracker, a separate process started
    with the pool, then removes them, as it should, but also warns on the console ("leaked
    semaphore objects") after the run's one closing line. It inherits this environment: that one
    warning is turned off there (and in the workers), nothing else."""
    rule = "ignore:resource_tracker:UserWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if rule not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, rule]))


def local_worker_pool():
    """Prefect's ProcessPoolTaskRunner whose worker processes all start when it is entered, with SIGINT
    ignored from their first instruction: a Ctrl-C reaches the whole process group, and a worker still
    importing Prefect (seconds, before local_worker_setup runs) would otherwise print a KeyboardInterrupt
    traceback. The flow's process stops its workers itself (flows.interrupt)."""
    from prefect.task_runners import ProcessPoolTaskRunner

    class LocalWorkerPool(ProcessPoolTaskRunner):
        def __enter__(self):
            super().__enter__()
            start_ignoring_sigint(self._executor, self._max_workers)   # Prefect's executor attribute
            return self
    return LocalWorkerPool


def start_ignoring_sigint(executor, n: int) -> None:
    """Start the `n` processes of a spawn ProcessPoolExecutor now, SIGINT ignored in them: ignored here
    while they are exec'd (an ignored signal stays ignored across exec, and Python then leaves it so).
    Only from the main thread (where signal handlers are set); elsewhere they start as tasks come."""
    if threading.current_thread() is not threading.main_thread():
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for _ in range(n):
            executor.submit(int)                 # each submit spawns a process while none is idle
    finally:
        signal.signal(signal.SIGINT, before)


def local_worker_setup(quiet: bool) -> None:
    """In each local worker process, before torch is imported: one intra-op thread; the console
    filters of `lmsys run` when it runs without --verbose. A worker ignores Ctrl-C (the terminal
    sends SIGINT to the whole process group: the flow's process stops its workers itself,
    flows.interrupt) and exits when the flow's process is gone (watch_parent)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(os.getppid())
    if quiet:
        from lmsys.console import quiet_console
        quiet_console()


PARENT_POLL_S = 1.0


def watch_parent(parent: int, every_s: float = PARENT_POLL_S) -> threading.Thread:
    """Exit this process within `every_s` of process `parent` ending (SIGKILL included: nothing
    of the parent runs then). A thread polls the parent pid, which changes when the process is
    re-parented: PR_SET_PDEATHSIG would fire when the parent's *thread* that spawned this worker
    ends, not the parent, so it cannot be used alone; a killed run's workers otherwise finish
    their task for a dead flow and then wait forever (issue 22)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)
    t = threading.Thread(target=watch, name="lmsys-parent-watchdog", daemon=True)
    t.start()
    return t


def prefect_api_url() -> str | None:
    from prefect.settings import get_current_settings
    url = get_current_settings().api.url
    return str(url) if url else None


def check_slurm(cfg: dict, gpu_tasks: list[str] = ()) -> None:
    """Fail before anything is submitted when no SLURM worker could ever run the flow's tasks."""
    s = cfg["orchestration"]["slurm"]
    check_dask_api("slurm")
    gpus = int(s["gpus_per_job"])
    if gpu_tasks and gpus < 1:
        raise ValueError(f"orchestration.slurm.gpus_per_job={gpus}: no SLURM worker would offer a GPU, yet "
                         f"{len(gpu_tasks)} task(s) need one ({', '.join(gpu_tasks[:4])}"
                         f"{', ...' if len(gpu_tasks) > 4 else ''}); set gpus_per_job >= 1 or use --runner local")
    if int(s["max_jobs"]) < 1:
        raise ValueError(f"orchestration.slurm.max_jobs={s['max_jobs']}: no worker job could start")


def log_dir(cfg: dict) -> Path:
    return Layout.of(cfg).art / "slurm-logs"


def slurm_cluster_kwargs(cfg: dict) -> dict:
    """SLURMCluster arguments from params.yaml's orchestration.slurm."""
    s = cfg["orchestration"]["slurm"]
    gpus = int(s["gpus_per_job"])
    prologue = list(s["prologue"] or [])
    url = prefect_api_url()
    if url:                                    # explicit, also where sbatch runs with --export=NONE
        prologue.append(f"export PREFECT_API_URL={shlex.quote(url)}")
    kw = {"queue": s["queue"], "account": s["account"], "walltime": s["walltime"], "memory": s["memory"],
          "cores": int(s["cores"]), "processes": int(s["processes"]), "job_script_prologue": prologue,
          "job_extra_directives": [f"--gres=gpu:{gpus}"] if gpus else [],
          "worker_extra_args": ["--resources", f"GPU={gpus}"] if gpus else [],
          "python": sys.executable, "log_directory": str(log_dir(cfg)), "job_name": "lmsys-worker",
          "scheduler_options": {"dashboard_address": ":0"}}
    if s.get("interface"):
        kw["interface"] = s["interface"]
    return {k: v for k, v in kw.items() if v is not None}


def cpu_job_template(cfg: dict) -> dict:
    """queue, walltime, memory and cores of the CPU-only jobs (orchestration.slurm.cpu_job, its nulls
    taken from the GPU template: lmsys.plan.job_template); they request no GPU."""
    from lmsys.plan import job_template
    t = job_template(cfg, gpu=False)
    return {k: t[k] for k in ("queue", "walltime", "memory", "cores")}


def slurm_task_runner(cfg: dict):
    from prefect_dask import DaskTaskRunner
    check_slurm(cfg)
    s = cfg["orchestration"]["slurm"]
    kw, cluster_class = slurm_cluster_kwargs(cfg), "dask_jobqueue.SLURMCluster"
    if int(s.get("cpu_jobs") or 0):
        kw, cluster_class = ({**kw, "cpu_jobs": int(s["cpu_jobs"]), "cpu_job": cpu_job_template(cfg)},
                             "flows.slurm_cpu.SLURMClusterWithCpuJobs")
    # target_duration: one job per ready task (up to max_jobs). Dask's default sizes the cluster by
    # expected seconds of work (5 s per worker), which with unknown or short-task durations would
    # run two long folds one after the other on one job.
    return DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kw,
                          adapt_kwargs={"minimum": int(s["min_jobs"]), "maximum": int(s["max_jobs"]),
                                        "target_duration": "10ms", "wait_count": 10})


# ---------------------------------------------------------------- local-gpus: one machine, many GPUs, no SLURM

def gpu_worker_name(group: tuple[str, ...]) -> str:
    """The Dask worker of a device group: `gpu-0`, `gpu-0,1,2,3` (its CUDA_VISIBLE_DEVICES)."""
    return "gpu-" + ",".join(group)


def local_gpu_workers(cfg: dict) -> dict[str, dict]:
    """SpecCluster worker specs of the local-gpus runner: one Nanny per device group of
    lmsys.plan.local_gpu_layout (every device alone, and the aligned groups of each wider step width,
    orchestration.step_gpus), each its own process seeing only its group (env CUDA_VISIBLE_DEVICES) and
    offering resources {"GPU": group size}, one task at a time; plus orchestration.local_workers CPU
    workers that see no GPU and offer the CPU resource CPU steps ask for. Groups overlap (gpu-0 and
    gpu-0,1,2,3 share device 0): the flow submits a GPU task only to a group none of whose devices is
    busy (flows.pipeline.Scheduler, lmsys.schedule.DevicePool), so they never run on one device at once.
    No memory limit: a 70B load must not get a worker paused or restarted by Dask."""
    from lmsys.plan import local_gpu_layout
    common = {"nthreads": 1, "memory_limit": 0, "host": "127.0.0.1"}
    workers = {gpu_worker_name(g): {"cls": "distributed.Nanny", "options": {
        **common, "env": {"CUDA_VISIBLE_DEVICES": ",".join(g)}, "resources": {"GPU": len(g)}}}
        for g in local_gpu_layout(cfg)}
    for i in range(int(cfg["orchestration"]["local_workers"])):
        workers[f"cpu-{i}"] = {"cls": "distributed.Nanny", "options": {
            **common, "env": {"CUDA_VISIBLE_DEVICES": ""}, "resources": {CPU_RESOURCE: 1}}}
    return workers


def local_gpu_task_runner(cfg: dict):
    """prefect-dask's DaskTaskRunner over a distributed SpecCluster of this machine's Nanny workers
    (local_gpu_workers), its scheduler on 127.0.0.1. Not dask-cuda: it pins another dask/distributed,
    patches every dask import through a .pth hook and does not import without CUDA bindings.
    Like slurm, the worker processes report to the Prefect API of PREFECT_API_URL (check_dask_api)."""
    from prefect_dask import DaskTaskRunner
    check_dask_api("local-gpus")
    return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs={
        "workers": local_gpu_workers(cfg),
        "scheduler": {"cls": "distributed.Scheduler", "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}})


def check_dask_api(runner: str) -> None:
    """Fail before any worker starts when the worker processes would have no Prefect API to report to."""
    if not prefect_api_url():
        from flows.server import needs_server
        raise ValueError(needs_server(runner))


# ---------------------------------------------------------------- waiting for the next task to finish

def wait_any(running: dict, cfg: dict, task_runner) -> list[str]:
    """Block until at least one of `running` (label -> Prefect future) is done; return the labels of
    those done. On the Dask runner, raise when no worker has been connected for
    orchestration.slurm.worker_wait_s while tasks wait (a task needing a worker that no job can
    provide would otherwise wait forever)."""
    client = task_runner.client if is_dask(task_runner) else None
    wait_s = float(cfg["orchestration"]["slurm"]["worker_wait_s"])
    last_worker = time.monotonic()
    woke = threading.Event()
    for f in running.values():
        f.add_done_callback(lambda _: woke.set())
    while True:
        done = [t for t, f in running.items() if _done(f)]
        if done:
            return done
        if client is not None:
            if client.nthreads():
                last_worker = time.monotonic()
            elif time.monotonic() - last_worker > wait_s:
                msg = no_worker_message(cfg, task_runner, list(running), wait_s)
                _stop_scaling(task_runner)
                raise RuntimeError(msg)
        woke.wait(1.0)
        woke.clear()


def _done(future) -> bool:
    """Has the task behind a Prefect future finished (its runner's own future, no API call)?"""
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped.done() if wrapped is not None else future.state.is_final()


def no_worker_message(cfg: dict, task_runner, waiting: list[str], wait_s: float) -> str:
    s = cfg["orchestration"]["slurm"]
    cluster = task_runner.client.cluster if is_dask(task_runner) else None
    ids = [str(j.job_id) for j in getattr(cluster, "workers", {}).values() if getattr(j, "job_id", None)]
    if ids:
        q = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"], capture_output=True, text=True, check=False)
        jobs = "; ".join(q.stdout.split("\n")[:-1] if q.stdout else []) or f"{', '.join(ids)} (no longer queued)"
    else:
        jobs = "none submitted"
        if cluster is not None:                # ask sbatch why, without submitting
            r = subprocess.run(["sbatch", "--test-only"], input=cluster.job_script(), capture_output=True, text=True, check=False)
            jobs += f"; sbatch --test-only says: {(r.stderr or r.stdout).strip()[-300:]}"
    return (f"no SLURM worker joined within {wait_s:g} s (orchestration.slurm.worker_wait_s) while "
            f"{len(waiting)} task(s) waited ({', '.join(waiting[:4])}). SLURM jobs: {jobs}. Check "
            f"orchestration.slurm (queue={s['queue']!r}, gpus_per_job={s['gpus_per_job']}, memory={s['memory']!r}, "
            f"cores={s['cores']}) against `sinfo -o '%P %c %m %G'`; worker logs in {log_dir(cfg)}")


def _stop_scaling(task_runner) -> None:
    """Stop adaptive scaling, and forget the jobs that never started (sbatch refused them), so the
    cluster closes cleanly: distributed asserts at close that every job it created was started."""
    from distributed.core import Status
    cluster = task_runner.client.cluster if is_dask(task_runner) else None
    adaptive = getattr(cluster, "_adaptive", None)   # private: distributed has no public way to stop adapting
    if adaptive is not None:
        adaptive.stop()
    for job in list(getattr(cluster, "_created", ())):   # private: no public way to drop a job sbatch refused
        if job.status == Status.created:
            cluster._created.discard(job)
