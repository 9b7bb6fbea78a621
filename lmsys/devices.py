"""What the code asks of the device it runs on: its CUDA compute capability, the TF32 switch, and
which of a job's GPUs a step uses when the job runs several steps side by side (`claimed_devices`).

Decisions that depend on the card read its compute capability here, in one place: TF32 for the fp32
LoRA matmuls (Ampere, 8.0, and newer), and whether inference takes the packed path (lmsys.infer:
only on capabilities where its kernels were checked, `infer.verified_capabilities`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

TF32_FROM = (8, 0)          # Ampere: the first tensor cores with TF32


def capability(device: str | torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def capability_text(cap: tuple[int, int] | None) -> str:
    """"9.0" for (9, 0); "" for None (not a CUDA device)."""
    return "" if cap is None else f"{cap[0]}.{cap[1]}"


def enable_tf32(device: str | torch.device) -> bool:
    """TF32 on for CUDA float32 matmuls when `device` is a CUDA card of capability 8.0 or newer (the
    LoRA branches and the head run in fp32 beside bf16 weights: TF32 keeps fp32's range with a 10-bit
    mantissa, as bf16 compute already rounds harder). CUDA matmuls only: CPU results do not change.
    Returns whether it was turned on."""
    cap = capability(device)
    if cap is None or cap < TF32_FROM:
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):     # torch >= 2.9: the new API (mixing it with allow_tf32 raises)
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    return True


# ---------------------------------------------------------------- a job's GPUs shared by its steps

_busy: set[str] = set()
_freed = threading.Condition()


def visible_devices() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (all it sees when unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def claimed_devices(n: int, devices: list[str] | None = None):
    """n of `devices` (default visible_devices()) that no other step of this process holds, for the
    length of the block; waits until n are free. A SLURM job of gpus_per_job GPUs runs several steps at
    once (Dask threads, each step's GPUs a worker resource): each step's processes get its own devices
    through CUDA_VISIBLE_DEVICES. Raises ValueError when there are fewer than n devices at all."""
    devices = visible_devices() if devices is None else list(devices)
    if n > len(devices):
        raise ValueError(f"a step of {n} GPUs in a process that sees {len(devices)}: {devices}")
    with _freed:
        while len([d for d in devices if d not in _busy]) < n:
            _freed.wait()
        mine = [d for d in devices if d not in _busy][:n]
        _busy.update(mine)
    try:
        yield mine
    finally:
        with _freed:
            _busy.difference_update(mine)
            _freed.notify_all()
