"""The SLURM part of the preflight (`lmsys check --runner slurm`): the commands, the partition and its
GRES, `sbatch --test-only`, then one job on the GPU worker type that runs `python -m lmsys.check job DIR`
(lmsys.check.job_checks: the GPU report, `api_check` from the compute node, the forward passes) and
writes its result beside the job script.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

from lmsys.check_table import FAIL, OK, SKIP, Check, one_line
from lmsys.io import write_json
from lmsys.paths import Layout

JOB_MARKER = "lmsys-check: prologue done"
JOB_RUN_LIMIT_S = 3600                      # a check job running longer is cancelled (three 70B nf4 loads fit)


def api_check(api_url: str | None) -> Check:
    """GET <api>/health from this process (inside a job: from a compute node)."""
    name = "slurm: Prefect API from a compute node"
    fix = ("start the server where the nodes reach it (`prefect server start --host <address>`) and set "
           "PREFECT_API_URL to that address")
    if not api_url:
        return Check(name, FAIL, "no PREFECT_API_URL", fix)
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=10) as r:
            ok = r.status == 200
    except OSError as e:
        return Check(name, FAIL, f"{api_url}: {one_line(e)} (from {socket.gethostname()})", fix)
    return Check(name, OK if ok else FAIL, f"{api_url} answers from {socket.gethostname()}", "" if ok else fix)


def slurm_checks(cfg: dict, layout: Layout, api_url: str | None, rows: pd.DataFrame, names: list[str],
                 in_job=None) -> list[Check]:
    """Commands, partition, GRES, sbatch --test-only, then one job that runs job_checks (GPU report, API
    probe, forward checks) on the worker type the GPU steps use; in_job: see run_checks."""
    s = cfg["orchestration"]["slurm"]
    missing = [c for c in ("sinfo", "sbatch", "squeue", "scancel") if not shutil.which(c)]
    if missing:
        return [Check("slurm: commands", FAIL, f"{', '.join(missing)} not on PATH",
                      "run `lmsys check` on the cluster's login node, or use --runner local")]
    parts = sinfo_partitions()
    lines = [partition_check(s["queue"], parts)]
    if lines[-1].status == OK:
        lines.append(gres_check(s["queue"], int(s["gpus_per_job"]), parts))
    if any(c.status == FAIL for c in lines):
        return lines + [Check("slurm: job", SKIP, "not submitted: fix the lines above first")] + \
            [Check(f"model {n}: forward", SKIP, "not run: no SLURM job") for n in names]
    job_dir = Path(tempfile.mkdtemp(prefix="check-", dir=_mkdir(layout.art / ".check")))
    try:
        script = job_dir / "check.sh"
        script.write_text(job_script(cfg, job_dir, api_url))
        lines.append(sbatch_test_only_check(script, s))
        if lines[-1].status == FAIL:
            return lines + [Check(f"model {n}: forward", SKIP, "not run: the job was refused") for n in names]
        if in_job is not None:
            try:
                return lines + [Check(**c) for c in in_job(names, rows, api_url)]
            except Exception as e:               # noqa: BLE001  (a lost or unreachable worker is the finding)
                return lines + [Check("slurm: job", FAIL, f"the check on a worker of the flow's cluster: {one_line(e)}",
                                      "see the worker logs in artifacts/<profile>/slurm-logs")]
        rows.to_parquet(job_dir / "rows.parquet")
        write_json({"cfg": cfg, "names": names, "api_url": api_url}, job_dir / "job.json")
        return lines + run_check_job(script, job_dir, cfg, names)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _mkdir(p: Path) -> str:
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


def sinfo_partitions() -> dict[str, dict]:
    """{partition: {"up": bool, "gpus": max gpu GRES count of its nodes, "gres": [raw strings]}}."""
    r = subprocess.run(["sinfo", "-h", "-o", "%P|%a|%G"], capture_output=True, text=True, check=False)
    parts: dict[str, dict] = {}
    for line in r.stdout.splitlines():
        name, avail, gres = (line.split("|") + ["", ""])[:3]
        p = parts.setdefault(name.rstrip("*"), {"up": False, "gpus": 0, "gres": []})
        p["up"] |= avail.strip() == "up"
        p["gres"].append(gres.strip())
        for g in gres.split(","):
            m = re.match(r"gpu(?::[^:(]+)?:(\d+)", g.strip())
            if m:
                p["gpus"] = max(p["gpus"], int(m.group(1)))
    return parts


def partition_check(queue: str, parts: dict) -> Check:
    name = "slurm: partition"
    if queue not in parts:
        return Check(name, FAIL, f"partition {queue!r} does not exist (sinfo lists: {', '.join(parts) or 'none'})",
                     f"set orchestration.slurm.queue to one of them (--set orchestration.slurm.queue={next(iter(parts), 'NAME')})")
    if not parts[queue]["up"]:
        return Check(name, FAIL, f"partition {queue!r} is not up", "ask the cluster's admins, or pick another partition")
    return Check(name, OK, f"{queue!r} is up")


def gres_check(queue: str, gpus: int, parts: dict) -> Check:
    have = parts[queue]["gpus"]
    if gpus < 1:
        return Check("slurm: GRES", OK, "no GPU requested (gpus_per_job=0)")
    if have < gpus:
        return Check("slurm: GRES", FAIL, f"gpus_per_job={gpus} but the nodes of {queue!r} offer at most gpu:{have} "
                     f"(GRES {', '.join(parts[queue]['gres'])})", f"set orchestration.slurm.gpus_per_job <= {have} "
                     "or pick a GPU partition")
    return Check("slurm: GRES", OK, f"gpu:{gpus} per job; nodes offer up to gpu:{have}")


def _sbatch_memory(memory: str) -> str:
    """'16GB' (dask-jobqueue style) -> '16G' (sbatch style)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", str(memory), re.IGNORECASE)
    return f"{m.group(1)}{m.group(2).upper()}" if m else str(memory)


def job_script(cfg: dict, job_dir: Path, api_url: str | None) -> str:
    """The check job: the workers' directives and prologue, then `python -m lmsys.check job DIR`."""
    from lmsys.config import ROOT
    s = cfg["orchestration"]["slurm"]
    lines = ["#!/usr/bin/env bash", "#SBATCH -J lmsys-check", f"#SBATCH -p {s['queue']}", "#SBATCH -n 1",
             f"#SBATCH -c {int(s['cores'])}", f"#SBATCH --mem={_sbatch_memory(s['memory'])}", f"#SBATCH -t {s['walltime']}",
             f"#SBATCH -o {job_dir}/job.out", f"#SBATCH -e {job_dir}/job.out"]
    if s.get("account"):
        lines.append(f"#SBATCH -A {s['account']}")
    if int(s["gpus_per_job"]):
        lines.append(f"#SBATCH --gres=gpu:{int(s['gpus_per_job'])}")
    lines += ["set -e", *(s.get("prologue") or []), f"echo '{JOB_MARKER}'"]
    if api_url:
        lines.append(f"export PREFECT_API_URL='{api_url}'")
    lines += [f"cd '{ROOT}'", f"exec '{sys.executable}' -m lmsys.check job '{job_dir}'"]
    return "\n".join(lines) + "\n"


def sbatch_test_only_check(script: Path, s: dict) -> Check:
    r = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, check=False)
    said = (r.stderr or r.stdout).strip().splitlines()
    if r.returncode:
        return Check("slurm: job accepted (sbatch --test-only)", FAIL, "; ".join(said)[-400:],
                     f"check orchestration.slurm (queue={s['queue']!r}, account={s['account']!r}, "
                     f"gpus_per_job={s['gpus_per_job']}, memory={s['memory']!r}, walltime={s['walltime']!r}, "
                     f"cores={s['cores']}) against `sinfo -o '%P %c %m %G %l'`")
    return Check("slurm: job accepted (sbatch --test-only)", OK, (said[-1] if said else "").removeprefix("sbatch: "))


def run_check_job(script: Path, job_dir: Path, cfg: dict, names: list[str]) -> list[Check]:
    """Submit the check job, wait for its result (pending at most orchestration.slurm.worker_wait_s)."""
    s = cfg["orchestration"]["slurm"]
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    if r.returncode:
        return [Check("slurm: job", FAIL, (r.stderr or r.stdout).strip()[-400:], "see sbatch's message")]
    job = r.stdout.strip().split(";")[0]
    t0, state, result = time.monotonic(), "", job_dir / "result.json"
    while not result.exists():
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True, check=False)
        state = q.stdout.strip()
        if not state:                            # left the queue without a result
            time.sleep(1.0)
            break
        waited = time.monotonic() - t0
        if state.startswith("PENDING") and waited > float(s["worker_wait_s"]):
            subprocess.run(["scancel", job], check=False)
            return [Check("slurm: job", FAIL, f"job {job} still pending after {waited:.0f} s ({state})",
                          "the partition has no free node of that shape: check gpus_per_job, memory and cores, or "
                          "raise orchestration.slurm.worker_wait_s")]
        if waited > JOB_RUN_LIMIT_S:
            subprocess.run(["scancel", job], check=False)
            return [Check("slurm: job", FAIL, f"job {job} still {state} after {waited:.0f} s: cancelled",
                          "a hung or very slow model load: run `lmsys -v check --runner local` on a GPU node to watch it")]
        time.sleep(1.0)
    log = (job_dir / "job.out").read_text(errors="replace") if (job_dir / "job.out").exists() else ""
    if JOB_MARKER not in log:
        return [Check("slurm: job prologue", FAIL, f"job {job} stopped in its prologue: {log.strip()[-400:]}",
                      "fix orchestration.slurm.prologue (every line must succeed on the compute node)")]
    lines = [Check("slurm: job prologue", OK, f"job {job}: prologue ran")]
    if not result.exists():
        return lines + [Check("slurm: job", FAIL, f"job {job} ended without a result: {log.strip()[-400:]}",
                              "see the job's output above; the job runs `python -m lmsys.check job`")]
    return lines + [Check(**c) for c in json.loads(result.read_text())]
