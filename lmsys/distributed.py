"""Data-parallel steps: one step run as N torch.distributed ranks on one node (orchestration.step_gpus).

The flow still sees one task per step. The task's process (lmsys.steps.recipe.run_step) launches the
ranks as child processes, torchrun-style (`launch`: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in each one's environment, `python -m lmsys.distributed JOB_DIR`), waits for all of them
and returns rank 0's result; when one rank fails the others are stopped, and a rank dies with the
process that launched it. nccl on CUDA (rank r on cuda:r of the GPUs the task sees), gloo on a CPU.

Inside a rank the library asks this module who it is (world, rank, is_main) and for the few
collectives it needs; outside one (world 1) every helper is the identity, so single-process code
runs unchanged.
  training   lmsys.train: each optimizer step's rows dealt to the ranks by tokens (`deal`), each rank
             accumulating its share's gradients with the loss scaled by the global row count, then one
             all-reduce (sum) of the trainable gradients (`all_sum`): every rank steps the same
             optimizer on the same gradients. This is DDP's arithmetic without torch's DDP wrapper: its
             reducer needs the wrapped module's forward, which the packed path does not call (it runs the
             decoder and the head itself), and with accumulation it would sync only the last micro-batch
             anyway; LoRA gradients are small (one all-reduce a step of 64 rows).
  inference  lmsys.infer.predict_logits_resumable: whole shards dealt to the ranks by tokens; each rank
             writes its shards, then every rank reads all of them.

torch is imported inside the functions: the plan and the recipe table import this module.
"""
from __future__ import annotations

import ctypes
import heapq
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULT = "result.json"


def step_width(cfg: dict, name: str) -> int:
    """GPUs (ranks) step `name` runs on: orchestration.step_gpus[name], else 1. Raises ValueError below 1."""
    n = int((cfg["orchestration"].get("step_gpus") or {}).get(name, 1))
    if n < 1:
        raise ValueError(f"orchestration.step_gpus.{name} must be >= 1, got {n}")
    return n


# ---------------------------------------------------------------- who am I

def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    dist = _dist() if "torch" in sys.modules else None
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    dist = _dist() if "torch" in sys.modules else None
    return dist.get_rank() if dist is not None else 0


def is_main() -> bool:
    """Rank 0, or no ranks at all: the process that writes a step's outputs."""
    return rank() == 0


# ---------------------------------------------------------------- collectives (identities at world 1)

def barrier() -> None:
    if world() > 1:
        _dist().barrier()


BUCKET = 64 * 2**20          # elements a flat all-reduce carries (256 MB of fp32): bounds the extra memory


def all_sum(tensors: list, bucket: int = BUCKET) -> None:
    """Sum each tensor over the ranks, in place: flat all-reduces of up to `bucket` elements (a 70B
    model's LoRA r=64 gradients, ~0.8 G fp32 values, go in a dozen)."""
    if world() == 1 or not tensors:
        return
    import torch
    group: list = []
    for i, t in enumerate(tensors):
        group.append(t)
        if i + 1 == len(tensors) or sum(g.numel() for g in group) + tensors[i + 1].numel() > bucket:
            flat = torch.cat([g.reshape(-1) for g in group])
            _dist().all_reduce(flat)
            at = 0
            for g in group:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
            group = []


def all_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (picklable objects)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    _dist().all_gather_object(out, obj)
    return out


def deal(tokens, n: int) -> list[np.ndarray]:
    """Positions of `tokens` (a cost per item) dealt to n ranks: longest first (equal costs in input
    order), each to the least-loaded rank (the lowest rank on a tie). Rank loads end within one
    item of each other: with 8 ranks ~0.99 of the ideal where equal counts reach ~0.82 (issue 19)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    loads = [(0, r) for r in range(n)]
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in np.argsort(-tokens, kind="stable"):
        load, r = heapq.heappop(loads)
        shares[r].append(int(i))
        heapq.heappush(loads, (load + int(tokens[i]), r))
    return [np.asarray(s, dtype=np.int64) for s in shares]


# ---------------------------------------------------------------- launching ranks

def launch(target: str, payload: dict, n: int, job_dir: str | Path, poll_s: float = 0.2,
           devices: list[str] | None = None) -> dict:
    """Run `target` ("module:function", called with `payload`) in n ranks and return what rank 0's
    call returned (a JSON-able dict). `devices`: the GPUs the ranks see (CUDA_VISIBLE_DEVICES; rank r
    uses the r-th); default what this process sees. Each rank logs to job_dir/rank-R.log. Raises
    RuntimeError naming the first rank that failed (with its log's tail); the other ranks are killed then."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.json").write_text(json.dumps({"target": target, "payload": payload}, default=str))
    for old in [job_dir / RESULT, *job_dir.glob("error-*.txt")]:
        old.unlink(missing_ok=True)
    port = _free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": threads}
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        with open(job_dir / f"rank-{r}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "lmsys.distributed", str(job_dir), str(os.getpid())],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        while any(p.poll() is None for p in procs) and all(p.returncode in (None, 0) for p in procs):
            time.sleep(poll_s)
        if any(p.returncode not in (None, 0) for p in procs):
            raise RuntimeError(_failure(job_dir, procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads((job_dir / RESULT).read_text())


def _failure(job_dir: Path, procs: list) -> str:
    """What went wrong: the rank whose error came first (the others usually fail in a collective
    because of it), else the first that exited non-zero, with its log's tail."""
    time.sleep(1.0)                            # let the others write their error files
    raised = {r: float((job_dir / f"error-{r}.txt").read_text().split()[0])
              for r in range(len(procs)) if (job_dir / f"error-{r}.txt").exists()}
    failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    r = min(raised, key=raised.get) if raised else failed[0]
    tail = (job_dir / f"rank-{r}.log").read_text(errors="replace")[-3000:]
    return (f"rank {r} of the data-parallel step exited with {procs[r].poll()} (log {job_dir}/rank-{r}.log; ranks "
            f"failed: {failed}):\n{tail}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int) -> None:
    """SIGKILL this rank when the process that launched it dies (Linux prctl PR_SET_PDEATHSIG), so a
    killed task leaves no rank behind holding a GPU; exit now if it is already gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:                            # not Linux: the ranks end when their collectives fail
        return
    if os.getppid() != parent:
        os._exit(1)


def main(job_dir: str, parent: int) -> int:
    """A rank: join the process group, run the job's target, rank 0 writes its result."""
    _die_with(parent)
    import torch
    import torch.distributed as dist
    job = json.loads((Path(job_dir) / "job.json").read_text())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        module, function = job["target"].split(":")
        try:
            result = getattr(importlib.import_module(module), function)(job["payload"])
        except BaseException:
            (Path(job_dir) / f"error-{rank()}.txt").write_text(f"{time.time()!r}\n")     # when: the first is the cause
            raise
        if is_main():
            (Path(job_dir) / RESULT).write_text(json.dumps(result, default=str))
        barrier()
    finally:
        dist.destroy_process_group()
    return 0


def ping(payload: dict) -> dict:
    """`lmsys check`'s rank test: rank r adds r + 1 to one all-reduce; n(n + 1)/2 says all n took part."""
    import torch
    t = torch.tensor([float(rank() + 1)], device="cuda" if torch.cuda.is_available() else "cpu")
    all_sum([t])
    return {"world": world(), "sum": float(t.item()), "backend": _dist().get_backend() if _dist() else None}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
