"""Prefect tasks: one per pipeline step, derived from the recipe table (lmsys.steps.recipe).

Cache key = sha256 of (step, fan-out keys, profile, the step's params.yaml values, the content
hashes of its input files, the hash of its code: the import closure of its module, lmsys.steps.code). Paths are never hashed
as strings and Python objects are never pickled into the key. A task's result is small and
JSON-able: output paths, metrics, the host, pid, SLURM job, Dask worker and CUDA_VISIBLE_DEVICES it
ran under, when it started and finished. While a task runs, artifacts/<profile>/.running/<task>.json names where it runs.

Every run writes a stamp (artifacts/<profile>/.stamps/<task>.json) naming the key its outputs were
made under, and a manifest beside each output (lmsys.io.write_manifest: its content hash with every
file's size and mtime), so hashing an unchanged input later costs a stat per file, not a read of every
byte. The flow trusts a cache hit only when the outputs exist and carry the hit's key; otherwise it
reruns the task with refresh_cache (outputs deleted or overwritten by other params). `cached_here`
predicts a hit before submitting: the flow runs those in its own process (a SLURM rerun with nothing
changed starts no GPU job).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext
from prefect.transactions import get_transaction

from lmsys.config import get_dotted
from lmsys.io import content_hash, write_json, write_manifest
from lmsys.paths import Layout
from lmsys.steps import Step
from lmsys.steps import code
from lmsys.steps.recipe import STEPS, run_step as run, task_label

def code_hash(step: Step) -> str:
    """Hash of the step's code: every project module its module can import (lmsys.steps.code).
    Read from the files, not imported: a cached rerun must not pay the torch imports (~9 s)."""
    return code.code_hash(step.module)


def _key_path(p: Path, layout: Layout) -> str:
    """An input's name in the key: relative to the run root (a moved checkout or root keeps its cache)."""
    try:
        return p.resolve().relative_to(layout.root.resolve()).as_posix()
    except ValueError:
        return str(p)                          # outside the root (user data): named as given


def input_hashes(step: Step, cfg: dict, layout: Layout, keys: dict) -> dict[str, str]:
    out = {}
    for p in step.inputs(cfg, layout, **keys):
        p = Path(p)
        out[_key_path(p, layout)] = content_hash(p) if p.exists() else "missing"
    return out


def cache_key(name: str, cfg: dict, keys: dict) -> str:
    step, layout = STEPS[name], Layout.of(cfg)
    blob = {"step": name, "keys": keys, "profile": cfg["profile"],
            "params": {p: get_dotted(cfg, p) for p in step.params},
            "inputs": input_hashes(step, cfg, layout, keys), "code": code_hash(step)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def stamp_path(cfg: dict, name: str, keys: dict) -> Path:
    return Layout.of(cfg).art / ".stamps" / f"{task_label(name, keys)}.json"


def running_path(cfg: dict, name: str, keys: dict) -> Path:
    """Marker of a task in progress: where (host, pid, SLURM job) it runs since when."""
    return Layout.of(cfg).art / ".running" / f"{task_label(name, keys)}.json"


def outputs_match(cfg: dict, name: str, keys: dict, key: str) -> bool:
    """Do the step's outputs exist and come from a run under `key`?"""
    step, layout = STEPS[name], Layout.of(cfg)
    stamp = stamp_path(cfg, name, keys)
    if not stamp.exists() or not all(Path(p).exists() for p in step.outputs(cfg, layout, **keys)):
        return False
    return json.loads(stamp.read_text()).get("key") == key


def cached_here(cfg: dict, name: str, keys: dict) -> bool:
    """Will the task be a cache hit? Its key now, its outputs carrying that key (outputs_match), and
    Prefect's result record of that key in the result store. Cheap (manifests); no step code runs."""
    from prefect.results import get_result_store
    key = cache_key(name, cfg, keys)
    # the task's store, as Prefect derives it: inside a flow the flow's own store has no metadata
    # storage (a NullFileSystem, on which exists() is always False)
    return outputs_match(cfg, name, keys, key) and get_result_store().update_for_task(run_step).exists(key)


def _key_fn(context: TaskRunContext, parameters: dict) -> str:
    return cache_key(parameters["name"], parameters["cfg"], parameters["keys"])


def _dask_worker() -> str | None:
    """The name of the Dask worker running this task (local-gpus: `gpu-0,1`, `cpu-0`), None outside Dask."""
    distributed = sys.modules.get("distributed")      # a Dask worker has it loaded; nothing imported here
    if distributed is None:
        return None
    try:
        return str(distributed.get_worker().name)
    except ValueError:                                 # loaded, but this is not a worker's thread
        return None


@task(cache_key_fn=_key_fn, persist_result=True, log_prints=True)
def run_step(name: str, cfg: dict, keys: dict) -> dict:
    """Run one lmsys step (lmsys.steps.recipe) and return paths + metrics + where it ran."""
    from tasks.secrets import use_prefect_secret
    use_prefect_secret()                      # in this worker process too: the token may be a Secret block
    tx = get_transaction()                    # Prefect's key for this run: _key_fn's, inputs before the step
    key = tx.key if tx is not None and tx.key else cache_key(name, cfg, keys)   # (called outside a flow: compute it)
    where = {"host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "worker": _dask_worker(),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(), "started": time.time()}
    marker = running_path(cfg, name, keys)
    write_json({"task": task_label(name, keys), **where}, marker)
    t0 = time.perf_counter()
    try:
        result = run(name, cfg, Layout.of(cfg), **keys)
    finally:
        marker.unlink(missing_ok=True)         # stays only where the process died mid-task
    for p in result.outputs:
        write_manifest(p)                     # the next cache key reads it instead of rehashing the bytes
    info = {"step": name, "keys": keys, "key": key, "outputs": [str(p) for p in result.outputs],
            "metrics": result.metrics, **where, "seconds": time.perf_counter() - t0, "finished": time.time()}
    write_json({"key": key, "outputs": info["outputs"]}, stamp_path(cfg, name, keys))
    return json.loads(json.dumps(info, default=str))
