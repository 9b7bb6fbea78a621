"""The GPTQ kernel a quantized model runs with, chosen per device, and no kernel build inside a step.

gptqmodel 7.6.0's wheel ships no compiled extension: every CUDA kernel (Marlin, the fused GPTQ block
update) and the pack_block CPU helper are built with nvcc / a C++ compiler on first use. Inside the
quantize step on an H200, Marlin's build had not finished after 346 s (benchmarks/RESULTS.md). For
8 bits on compute capability 7.5 (a T4) only its torch and Triton kernels remain: Marlin needs nvcc
and fp16 there, ExLlamaV2 is 4-bit, Machete is Hopper-only. Triton compiles its kernels just in time,
in seconds (with a host C compiler for its launcher): a step may do that, and reports the first
call's time.

  choose_backend   quantize.backend auto: Marlin only where `lmsys check --build-kernels` built it for
                   this torch, CUDA and card (marlin_ready); else Triton on a GPU (the torch kernel when
                   Triton or a C compiler is missing); the torch kernel on a CPU. An explicit backend
                   that would need a build or cannot run there is refused with the fix
  forbid_builds    GPTQMODEL_DISABLE_GPTQ_CUDA=1 and GPTQMODEL_DISABLE_PACK_EXT=1 (gptqmodel's Python
                   fallbacks), set by lmsys.quantize before gptqmodel runs: no compiler inside a step
  build_marlin     `lmsys check --build-kernels`: Marlin built ahead of time, outside any step, timed
                   and recorded
  kernel_lines     what `lmsys check` reports: the kernel that will load here and on serve.cards
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from lmsys import target

AUTO, TORCH, TRITON, MARLIN = "auto", "gptq_torch", "gptq_triton", "gptq_marlin"
NO_BUILD_ENV = {"GPTQMODEL_DISABLE_GPTQ_CUDA": "1", "GPTQMODEL_DISABLE_PACK_EXT": "1"}
OK, FAIL = "ok", "FAIL"


class KernelError(ValueError):
    """A GPTQ backend that cannot load without building a kernel, or cannot run on the device."""


def forbid_builds() -> None:
    """gptqmodel's Python fallbacks instead of its fused GPTQ CUDA update and pack_block extension
    (both compiled on first use). An explicit value in the environment wins (e.g. =0 after
    prebuilding them)."""
    for k, v in NO_BUILD_ENV.items():
        os.environ.setdefault(k, v)


def c_compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(requested: str, capability: tuple[int, int] | None, dtype: str, *, marlin_built: bool,
                   cc: bool, triton: bool, where: str = "this device") -> tuple[str, str]:
    """(gptqmodel backend, why) for quantize.backend `requested` on a device of `capability` (None: a
    CPU) running `dtype`, given whether Marlin is built there, a C compiler and Triton are present.
    Raises KernelError (its text ends with the fix) when the request would build a kernel or cannot run."""
    if capability is None:
        if requested in (TRITON, MARLIN):
            raise KernelError(f"quantize.backend {requested} needs a CUDA device and {where} has none; "
                              "fix: quantize.backend auto (the torch kernel on a CPU)")
        return (TORCH, "a CPU: gptqmodel's torch kernel, nothing to compile") if requested == AUTO else \
            (requested, f"quantize.backend {requested}")
    cc_text = ".".join(map(str, capability))
    marlin_runs = tuple(capability) >= target.BF16_FROM or dtype == "float16"
    if requested == MARLIN or (requested == AUTO and marlin_built and marlin_runs):
        if not marlin_built:
            raise KernelError(f"quantize.backend {MARLIN}: Marlin is not built for {where} (compute capability "
                              f"{cc_text}): gptqmodel would compile it with nvcc inside the step (over 5 min); fix: "
                              "run `lmsys check --build-kernels` on such a node first, or quantize.backend auto")
        if not marlin_runs:
            raise KernelError(f"quantize.backend {MARLIN} refuses {dtype} on compute capability {cc_text}; "
                              "fix: serve.dtype float16, or quantize.backend auto")
        return MARLIN, f"Marlin, built ahead by `lmsys check --build-kernels` for {where}"
    if requested in (AUTO, TRITON):
        if triton and cc:
            return TRITON, f"Triton on compute capability {cc_text}: JIT-compiled in seconds on first call"
        missing = " and ".join(n for n, ok in (("triton", triton), ("a C compiler (cc/gcc)", cc)) if not ok)
        if requested == TRITON:
            raise KernelError(f"quantize.backend {TRITON} on {where} needs {missing}, which is absent; fix: install "
                              f"it, or quantize.backend {TORCH}")
        return TORCH, f"the torch kernel: {missing} absent on {where}, so no Triton"
    return requested, f"quantize.backend {requested}"


def choose_here(requested: str, dtype: str, device) -> tuple[str, str]:
    """choose_backend for `device` of this machine (a CPU device: the CPU choice, whatever GPU is visible)."""
    import torch
    capability = target.device_capability(device) if torch.device(device).type == "cuda" else None
    return choose_backend(requested, capability, dtype, marlin_built=capability is not None and marlin_ready(capability),
                          cc=c_compiler() is not None, triton=has_triton())


# ---------------------------------------------------------------- Marlin, built ahead of time

def record_path() -> Path:
    """Where build_marlin records what it built: $LMSYS_KERNEL_RECORD, default ~/.cache/lmsys/kernels.json."""
    return Path(os.environ.get("LMSYS_KERNEL_RECORD") or Path.home() / ".cache" / "lmsys" / "kernels.json")


def _stack() -> dict:
    import torch
    return {"gptqmodel": importlib.metadata.version("gptqmodel"), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def marlin_ready(capability: tuple[int, int]) -> bool:
    """Whether build_marlin built Marlin for this gptqmodel, torch and CUDA and a card of `capability`,
    and its libraries are still on disk (a wiped cache would be rebuilt inside the step)."""
    path = record_path()
    if not path.exists():
        return False
    rec = json.loads(path.read_text()).get(MARLIN) or {}
    try:
        same = all(rec.get(k) == v for k, v in _stack().items())
    except importlib.metadata.PackageNotFoundError:
        return False
    return (same and list(capability) in rec.get("capabilities", [])
            and bool(rec.get("libraries")) and all(Path(p).exists() for p in rec["libraries"]))


def build_marlin(say=print) -> tuple[str, str, str]:
    """`lmsys check --build-kernels`: build gptqmodel's Marlin kernels (fp16 and bf16) here, outside
    any step, print the time and record them. Returns (status, detail, fix) for the check table."""
    capability = target.device_capability()
    if capability is None:
        return "skip", "no CUDA device here: Marlin is built on the GPU node that runs it", ""
    if shutil.which("nvcc") is None:
        return (FAIL, "Marlin builds with nvcc, which is not on PATH here",
                "install the CUDA toolkit matching torch.version.cuda (or load its module), or keep quantize.backend "
                "auto (Triton, nothing to build)")
    from gptqmodel import extension
    from gptqmodel.utils.cpp import default_torch_ops_build_root
    roots = [default_torch_ops_build_root(f"marlin_{d}") for d in ("fp16", "bf16")]
    say(f"building gptqmodel's Marlin kernels with nvcc (compute capability {'.'.join(map(str, capability))}); "
        "this takes minutes once ...")
    t0 = time.perf_counter()
    try:
        extension.load("marlin")
    except RuntimeError as e:
        return FAIL, f"Marlin build failed: {' '.join(str(e).split())[:300]}", "see the nvcc output; keep quantize.backend auto"
    seconds = time.perf_counter() - t0
    libraries = sorted(str(p) for r in roots if r.exists() for p in r.rglob("*.so"))
    path = record_path()
    old = json.loads(path.read_text()) if path.exists() else {}
    caps = sorted({tuple(c) for c in (old.get(MARLIN) or {}).get("capabilities", [])} | {tuple(capability)})
    old[MARLIN] = {**_stack(), "capabilities": [list(c) for c in caps], "libraries": libraries,
                   "seconds": round(seconds, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=2) + "\n")
    say(f"Marlin built in {seconds:.0f} s; recorded in {path}")
    return OK, f"Marlin built in {seconds:.0f} s ({len(libraries)} libraries), recorded in {path}", ""


# ---------------------------------------------------------------- lmsys check

def kernel_lines(cfg: dict) -> list[tuple[str, str, str, str]]:
    """(check, status, detail, fix) lines: the GPTQ kernel quantize and predict load on this device, and
    the one a fresh machine of serve.cards loads (nothing built there, a C compiler assumed: Kaggle's
    image has gcc)."""
    q = cfg["quantize"]
    tgt = target.serving_target(cfg)
    here_cap = target.device_capability()
    here_dtype = tgt.dtype if tgt.cards else target.resolve_dtype(cfg["serve"]["dtype"], here_cap, "here")[0]
    where = "this machine" + (f" (compute capability {'.'.join(map(str, here_cap))})" if here_cap else " (CPU)")
    lines = []
    try:
        backend, why = choose_backend(q["backend"], here_cap, here_dtype, where=where,
                                      marlin_built=here_cap is not None and marlin_ready(here_cap),
                                      cc=c_compiler() is not None, triton=has_triton())
        lines.append(("quantize: GPTQ kernel here", OK, f"{backend}: {why}; no nvcc/C++ build inside a step "
                      f"({', '.join(f'{k}=1' for k in NO_BUILD_ENV)})", ""))
    except KernelError as e:
        detail, _, fix = str(e).partition("; fix: ")
        lines.append(("quantize: GPTQ kernel here", FAIL, detail, fix))
    if tgt.cards:
        try:
            backend, why = choose_backend(q["backend"], tgt.capability, tgt.dtype, where=f"serve.cards {tgt.cards}",
                                          marlin_built=False, cc=True, triton=True)
            lines.append((f"serve: GPTQ kernel on {tgt.cards}", OK, f"{backend} in {tgt.dtype}: {why}", ""))
        except KernelError as e:
            detail, _, fix = str(e).partition("; fix: ")
            lines.append((f"serve: GPTQ kernel on {tgt.cards}", FAIL, detail, fix))
    return lines
