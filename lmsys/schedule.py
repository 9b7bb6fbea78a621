"""Tasks with durations, GPU widths and dependencies placed on N GPUs: the cost plan's schedule.

List scheduling, as the flow runs: a task becomes ready when every task it waits for has
finished; whenever GPUs free up, the ready tasks are taken in priority order (the longest path
from the task to the end of the run, its own duration included: the classic critical-path
priority; ties in the given order) and each starts at once if its width of GPUs is free; a wider
task that does not fit lets narrower ones behind it start (no reservation). CPU tasks run on
their own `cpu_slots` (the CPU jobs) beside the GPUs.

`critical_path` is the longest chain of dependent tasks: no number of GPUs finishes sooner.
`segments` splits a task longer than a job's walltime into resumable job segments.

On one machine (the `local-gpus` runner) GPUs are not a pool any width can draw from: each Dask
worker owns a fixed group of devices (`device_groups`: one worker per device, and per aligned group
of each wider step width), and a task of width w runs on a width-w group whose devices are all free.
`DevicePool` hands those groups out; list_schedule with `groups` places tasks with it, and the flow
(flows/pipeline.py) submits each GPU task to the worker of the group the same pool gives it.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str
    seconds: float
    gpus: int                      # GPUs it holds while it runs (0: a CPU task)


def upward_rank(jobs: list[Job], deps: dict[str, list[str]]) -> dict[str, float]:
    """name -> the longest path (seconds) from the job's start to the end of the run."""
    by_name = {j.name: j for j in jobs}
    after: dict[str, list[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for d in deps.get(j.name, []):
            after[d].append(j.name)
    rank: dict[str, float] = {}
    for j in reversed(_topological(jobs, deps)):
        rank[j] = by_name[j].seconds + max((rank[a] for a in after[j]), default=0.0)
    return rank


def _topological(jobs: list[Job], deps: dict[str, list[str]]) -> list[str]:
    """Names in an order where every job follows the jobs it waits for (stable). Raises ValueError
    on a cycle or a dependency that is not a job."""
    names = [j.name for j in jobs]
    known = set(names)
    for n in names:
        missing = [d for d in deps.get(n, []) if d not in known]
        if missing:
            raise ValueError(f"{n} waits for unknown task(s) {missing}")
    done: set[str] = set()
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in done and all(d in done for d in deps.get(n, []))]
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(known - done)}")
        order += ready
        done |= set(ready)
    return order


def list_schedule(jobs: list[Job], deps: dict[str, list[str]], gpus: int, cpu_slots: int = 1,
                  groups: list[tuple[str, ...]] | None = None) -> dict[str, tuple[float, float]]:
    """name -> (start, end) seconds. `groups`: the device groups of one machine's workers
    (device_groups); a GPU job then needs a free group of its width, not just as many free GPUs.
    Raises ValueError when a job needs more GPUs than there are (or a width no group has)."""
    wide = [j for j in jobs if j.gpus > gpus]
    if wide:
        raise ValueError(f"{wide[0].name} needs {wide[0].gpus} GPUs, the schedule has {gpus}")
    devices = DevicePool(groups) if groups is not None else None
    if devices is not None:
        missing = sorted({j.gpus for j in jobs if j.gpus} - devices.widths)
        if missing:
            raise ValueError(f"no device group of width {missing[0]} (groups of {sorted(devices.widths)} GPUs)")
    rank, order = upward_rank(jobs, deps), {j.name: i for i, j in enumerate(jobs)}
    waiting = {j.name: j for j in jobs}
    free = {"gpu": gpus, "cpu": max(1, cpu_slots)}
    running: list[tuple[float, str, str, object]] = []       # heap of (end, name, pool, what it holds)
    placed: dict[str, tuple[float, float]] = {}
    now = 0.0
    while waiting:
        finished = {n for n, (_, end) in placed.items() if end <= now}
        ready = sorted((n for n in waiting if all(d in finished for d in deps.get(n, []))),
                       key=lambda n: (-rank[n], order[n]))
        for n in ready:
            pool, need = ("gpu", waiting[n].gpus) if waiting[n].gpus else ("cpu", 1)
            if pool == "gpu" and devices is not None:
                held = devices.take(need)
                if held is None:
                    continue
            elif need <= free[pool]:
                free[pool] -= need
                held = need
            else:
                continue
            placed[n] = (now, now + waiting.pop(n).seconds)
            heapq.heappush(running, (placed[n][1], n, pool, held))
        now = running[0][0]                          # the next task to finish frees what it held
        while running and running[0][0] <= now:
            _, _, pool, held = heapq.heappop(running)
            if isinstance(held, tuple):
                devices.release(held)
            else:
                free[pool] += held
    return placed


# ---------------------------------------------------------------- one machine's device groups

def device_groups(devices: list[str], widths) -> list[tuple[str, ...]]:
    """The device groups of one machine's GPU workers: for each width w (at most len(devices)), the
    aligned runs devices[0:w], devices[w:2w], ... (w = 1: every device alone). Devices left over at the
    end of a width that does not divide their number join no group of that width."""
    out: list[tuple[str, ...]] = []
    for w in sorted({int(w) for w in widths if 1 <= int(w) <= len(devices)}):
        out += [tuple(devices[i:i + w]) for i in range(0, len(devices) - w + 1, w)]
    return out


class DevicePool:
    """Which device groups are free. take(w) gives a width-w group none of whose devices is in use,
    preferring one inside the wider groups that are already broken into (so narrow tasks leave whole
    aligned groups free for wide ones); release(group) frees it."""

    def __init__(self, groups: list[tuple[str, ...]]):
        self.groups = list(groups)
        self.devices = list(dict.fromkeys(d for g in self.groups for d in g))
        self.widths = {len(g) for g in self.groups}
        self.busy: set[str] = set()

    def take(self, width: int) -> tuple[str, ...] | None:
        free = [g for g in self.groups if len(g) == width and not self.busy & set(g)]
        if not free:
            return None
        wider = [g for g in self.groups if len(g) > width]
        broken = lambda g: sum(len(self.busy & set(h)) for h in wider if set(g) <= set(h))  # noqa: E731
        group = max(free, key=lambda g: (broken(g), -self.groups.index(g)))
        self.busy |= set(group)
        return group

    def release(self, group: tuple[str, ...]) -> None:
        self.busy -= set(group)


def critical_path(jobs: list[Job], deps: dict[str, list[str]]) -> tuple[list[str], float]:
    """The longest chain of dependent jobs (names, first to last) and its seconds."""
    rank, by_name = upward_rank(jobs, deps), {j.name: j for j in jobs}
    after: dict[str, list[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for d in deps.get(j.name, []):
            after[d].append(j.name)
    roots = [j.name for j in jobs if not deps.get(j.name)]
    path = [max(roots, key=lambda n: rank[n])] if roots else []
    while path and after[path[-1]]:
        path.append(max(after[path[-1]], key=lambda n: rank[n]))
    return path, sum(by_name[n].seconds for n in path)


def segments(seconds: float, walltime_s: float, restart_s: float) -> tuple[int, float]:
    """(job segments, total seconds) of a resumable task that runs `seconds` when one job holds it,
    split into jobs of at most walltime_s; each segment after the first pays restart_s again (the
    model load, the checkpoint read, the work since the last checkpoint). Raises ValueError when
    a segment cannot make progress (restart_s >= walltime_s)."""
    if seconds <= walltime_s:
        return 1, seconds
    if restart_s >= walltime_s:
        raise ValueError(f"a restart of {restart_s:.0f} s does not fit a job of {walltime_s:.0f} s")
    n = 1 + math.ceil((seconds - walltime_s) / (walltime_s - restart_s))
    return n, seconds + (n - 1) * restart_s
