"""What the code asks of the device it runs on: its CUDA compute capability, and the TF32 switch.

Decisions that depend on the card read its compute capability here, in one place: TF32 for the fp32
LoRA matmuls (Ampere, 8.0, and newer), and whether inference takes the packed path (lmsys.infer:
only on capabilities where its kernels were checked, `infer.verified_capabilities`).
"""
from __future__ import annotations

import logging

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
