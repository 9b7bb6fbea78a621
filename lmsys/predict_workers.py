"""Predict on every visible device: one process per device, the rows of both A/B orders cut into units
of whole batches, the logits put back by row.

A unit is a run of whole batches of lmsys.infer.predict_logits' own order (rows sorted longest first,
cut every batch_size rows), so every batch a worker forms is the batch one process would form, and its
logits are bit for bit that process's: the submission does not depend on how many devices computed
it. With TTA on two devices each device takes one order (the recipe's 2xT4 split: the original order
on one T4, the swapped order on the other); otherwise each order is cut into as many units as it takes
to give every device one, balanced by padded tokens.

  devices(setting)      predict.devices: auto = every visible GPU (1 process on a CPU), or N
  logits_by_order(...)  in this process for one device, else one worker process per device
                        (`python -m lmsys.predict_workers DIR I`: CUDA_VISIBLE_DEVICES names its GPU;
                        on a CPU each worker gets its share of the torch threads)

Each worker loads the model itself (load_model below: the recorded serving dtype, the GPTQ
kernel for its device) and guards its logits (lmsys.infer.predict_logits_guarded).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
WORKER_LOG_TAIL = 3000      # characters of a failed worker's log quoted in the error


@dataclass(frozen=True)
class Unit:
    order: str            # "original" | "swapped"
    start: int            # first row of the unit in the order's length-sorted rows
    stop: int             # one past its last (a multiple of batch_size, or the order's row count)


def devices(setting, cuda_count: int | None = None) -> list[str]:
    """The devices predict runs on: predict.devices auto (every visible GPU, else one CPU process) or N
    (N GPUs, or N CPU processes where there is no GPU). Raises ValueError for N < 1 or more GPUs than visible."""
    if cuda_count is None:
        import torch
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    n = int(setting)
    if n < 1:
        raise ValueError(f"predict.devices {setting!r}: expected auto or a number >= 1")
    if cuda_count and n > cuda_count:
        raise ValueError(f"predict.devices {n}: only {cuda_count} GPU(s) visible")
    return [f"cuda:{i}" for i in range(n)] if cuda_count else ["cpu"] * n


def sorted_rows(ids: list[list[int]]) -> np.ndarray:
    """Row indices longest first, ties in input order: predict_logits' own order."""
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    return np.argsort(-lengths, kind="stable")


def plan_units(ids_by_order: dict[str, list[list[int]]], n_devices: int, batch_size: int) -> list[list[Unit]]:
    """Units per device: each order cut at batch boundaries into ceil(n_devices / n_orders) runs of about
    equal padded tokens, dealt out in turn (one device and one order: one unit)."""
    cuts = -(-n_devices // len(ids_by_order))
    units = []
    for order, ids in ids_by_order.items():
        rows = sorted_rows(ids)
        cost = np.array([len(ids[rows[b]]) * len(rows[b:b + batch_size]) for b in range(0, len(rows), batch_size)])
        edges = np.searchsorted(np.cumsum(cost), np.arange(1, cuts) * cost.sum() / cuts) if len(cost) else []
        bounds = sorted({0, *(int(e) + 1 for e in edges), len(cost)})
        units += [Unit(order, a * batch_size, min(b * batch_size, len(rows))) for a, b in zip(bounds, bounds[1:])
                  if a < b]
    per_device: list[list[Unit]] = [[] for _ in range(n_devices)]
    for i, u in enumerate(units):
        per_device[i % n_devices].append(u)
    return per_device


def run_units(model, ids_by_order: dict[str, list[list[int]]], units: list[Unit], pad_id: int, batch_size: int,
              fp32_model=None, path=None) -> tuple[dict[Unit, np.ndarray], dict]:
    """Logits of each unit's rows (in its sorted order) on the inference `path` (lmsys.infer.Route,
    default padded) and the guard's counts summed over the units."""
    from lmsys.infer import PADDED, predict_logits_guarded
    path = path or PADDED
    out, info = {}, {"nonfinite_rows": 0, "recomputed_fp32": 0}
    for u in units:
        rows = sorted_rows(ids_by_order[u.order])[u.start:u.stop]
        z, i = predict_logits_guarded(model, [ids_by_order[u.order][r] for r in rows], pad_id, batch_size,
                                      fp32_model=fp32_model, desc=f"predict {u.order}", path=path)
        out[u] = z
        info = {k: info[k] + i[k] for k in info}
    return out, info


def logits_by_order(model_dir: Path, ids_by_order: dict[str, list[list[int]]], pad_id: int, batch_size: int,
                    device_list: list[str], load: dict, infer: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """({order: logits [N, 3] in input order}, info) of the model at `model_dir` on `device_list`: in this
    process for one device, else one worker process per device. `load`: keyword arguments of
    load_model besides the dir and device (backend, nonfinite); `infer`: params.yaml's
    `infer` section, the inference path each worker routes its model on (lmsys.infer.route; None:
    padded; the packed path is within rounding of one device's, not bit for bit). info: devices, inference,
    units per device, nonfinite_rows, recomputed_fp32, seconds (per worker: load, first_call, predict)."""
    per_device = plan_units(ids_by_order, len(device_list), batch_size)
    if len(device_list) == 1:
        results, info = _compute(model_dir, device_list[0], ids_by_order, per_device[0], pad_id, batch_size, load, infer)
        infos = [info]
    else:
        results, infos = _spawn(model_dir, device_list, ids_by_order, per_device, pad_id, batch_size, load, infer)
    out = {o: np.full((len(ids), 3), np.nan, dtype=np.float32) for o, ids in ids_by_order.items()}
    for u, z in results.items():
        out[u.order][sorted_rows(ids_by_order[u.order])[u.start:u.stop]] = z
    if not all(np.isfinite(z).all() for z in out.values()):       # the units must cover every row once
        raise RuntimeError("predict: a row was left without logits (lmsys.predict_workers.plan_units)")
    return out, {"devices": device_list, "inference": infos[0]["inference"], "units": [[asdict(u) for u in us] for us in per_device],
                 "nonfinite_rows": sum(i["nonfinite_rows"] for i in infos),
                 "recomputed_fp32": sum(i["recomputed_fp32"] for i in infos), "workers": infos}


def _compute(model_dir, device, ids_by_order, units, pad_id, batch_size, load, infer=None) -> tuple[dict, dict]:
    """Load the model on `device` and run `units`: the work of one device, in whichever process."""
    from lmsys.infer import PADDED, route
    t0 = time.perf_counter()
    model, fp32_model, loaded = load_model(model_dir, device, **load)
    path = route(model, infer) if infer else PADDED
    t1 = time.perf_counter()
    results, info = run_units(model, ids_by_order, units, pad_id, batch_size, fp32_model, path)
    return results, {**info, **loaded, "device": device, "inference": path.describe(), "load_s": round(t1 - t0, 3),
                     "predict_s": round(time.perf_counter() - t1, 3)}


# ---------------------------------------------------------------- loading the final model

def load_tokenizer_of(model_dir: Path):
    """The tokenizer saved inside a merged or quantized model dir (pad token: eos when it has none)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path, device=None, backend: str = "auto", nonfinite: str = "recompute",
               dtype: str | None = None):
    """(eval model, fp32 loader or None, info) of a merged or quantized model dir on `device` (default:
    the step's), in the serving dtype its serving.json records (lmsys.target.load_dtype: checked
    against the weights; float16, with a warning, where the device has no bf16), a GPTQ model with the
    kernel chosen for the device (lmsys.kernels: quantize.backend `backend`, nothing compiled). The fp32
    loader is the non-finite guard's (lmsys.infer.predict_logits_guarded): None with nonfinite "fail"
    or for a float32 model. info: dtype, dtype_warning, backend, first_call_s (one short forward right
    after loading: where Triton JIT-compiles its kernels)."""
    import torch
    from safetensors import SafetensorError

    from lmsys import kernels, target
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    device = torch.device(device) if device is not None else device_of_step()
    warning = None
    try:
        if dtype is None:               # reads the score head's dtype from the weights: may meet a bad file
            dtype, warning = target.load_dtype(model_dir, target.device_capability(device))
            if warning:
                log.warning(warning)
        model, chosen = _load_weights(model_dir, device, backend, dtype)
    except SafetensorError as e:
        files = ", ".join(p.name for p in sorted(model_dir.glob("*.safetensors"))) or "no *.safetensors"
        raise ValueError(f"{model_dir}: its weights ({files}) cannot be read: {e} (truncated or corrupt: copy the "
                         "model again, or rerun the step that wrote it)") from None
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=torch.ones((1, 8), dtype=torch.long, device=device))
    info = {"dtype": dtype, "dtype_warning": warning, "backend": chosen,
            "first_call_s": round(time.perf_counter() - t0, 3)}
    fp32 = None
    if nonfinite == "recompute" and dtype != "float32":
        fp32 = lambda: load_model(model_dir, device, kernels.TORCH, "fail", "float32")[0]  # noqa: E731
    elif nonfinite not in ("recompute", "fail"):
        raise ValueError(f"serve.nonfinite {nonfinite!r}: expected recompute or fail")
    return model, fp32, info


def _load_weights(model_dir: Path, device, backend: str, dtype: str):
    """(model, the GPTQ kernel or None) of a merged or quantized model dir, in `dtype`."""
    from lmsys import kernels, target
    from lmsys.models import load_for_inference
    if (model_dir / "quantize.json").exists():
        from lmsys.quantize import load_quantized
        chosen, why = kernels.choose_here(backend, dtype, device)       # the kernel runs on the real device
        log.info("%s: GPTQ kernel %s (%s)", model_dir, chosen, why)
        return load_quantized(model_dir, device, chosen, target.torch_dtype(dtype)), chosen
    return load_for_inference(model_dir, {}, load_tokenizer_of(model_dir), device=device,
                              dtype=target.torch_dtype(dtype)), None


def device_of_step():
    from lmsys.steps.common import device
    return device()


# ---------------------------------------------------------------- worker processes

def _spawn(model_dir, device_list, ids_by_order, per_device, pad_id, batch_size, load, infer=None) -> tuple[dict, list]:
    """One `python -m lmsys.predict_workers` process per device, run side by side; their outputs read back."""
    import torch
    threads = max(1, torch.get_num_threads() // len(device_list))
    with tempfile.TemporaryDirectory(prefix="lmsys-predict-") as tmp:
        work = Path(tmp)
        for order, ids in ids_by_order.items():
            np.save(work / f"{order}.lengths.npy", np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
            np.save(work / f"{order}.ids.npy", np.fromiter((t for r in ids for t in r), dtype=np.int64))
        procs = []
        for i, dev in enumerate(device_list):
            (work / f"job{i}.json").write_text(json.dumps({
                "model_dir": str(model_dir), "orders": list(ids_by_order), "pad_id": pad_id, "batch_size": batch_size,
                "units": [asdict(u) for u in per_device[i]], "load": load, "infer": infer, "threads": threads,
                "device": "cuda:0" if dev.startswith("cuda") else "cpu"}))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join(filter(None, [_source_root(), os.environ.get("PYTHONPATH")]))}
            if dev.startswith("cuda"):
                env["CUDA_VISIBLE_DEVICES"] = _physical(dev)
            out = open(work / f"worker{i}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "lmsys.predict_workers", str(work), str(i)],
                                           stdout=out, stderr=subprocess.STDOUT, env=env), out))
        for p, out in procs:
            p.wait()
            out.close()
        results, infos = {}, []
        for i, (p, _) in enumerate(procs):
            err = work / f"error{i}.json"
            if err.exists():                    # an input or guard error in the worker: the same error here
                raise ValueError(json.loads(err.read_text())["message"])
            if p.returncode:
                tail = (work / f"worker{i}.log").read_text()[-WORKER_LOG_TAIL:]
                raise RuntimeError(f"predict worker {i} on {device_list[i]} exited {p.returncode}: {tail}")
            z = np.load(work / f"out{i}.npz")
            for k, u in enumerate(per_device[i]):
                results[u] = z[f"unit{k}"]
            infos.append(json.loads((work / f"info{i}.json").read_text()))
        return results, infos


def _source_root() -> str:
    """The directory holding the lmsys package this process imported (a worker imports the same one)."""
    return str(Path(__file__).resolve().parent.parent)


def _physical(device: str) -> str:
    """The CUDA_VISIBLE_DEVICES entry of `cuda:i` as this process sees it."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    i = int(device.split(":")[1])
    return visible[i] if visible else str(i)


def _read_ids(work: Path, order: str) -> list[list[int]]:
    lengths, flat = np.load(work / f"{order}.lengths.npy"), np.load(work / f"{order}.ids.npy")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


def worker_main(work_dir: str, index: int) -> int:
    """One worker: job<i>.json -> out<i>.npz (logits per unit) and info<i>.json; an input or guard error
    (ValueError) -> error<i>.json, which the parent raises again."""
    import torch
    work = Path(work_dir)
    job = json.loads((work / f"job{index}.json").read_text())
    torch.set_num_threads(job["threads"])
    ids_by_order = {o: _read_ids(work, o) for o in job["orders"]}
    units = [Unit(**u) for u in job["units"]]
    try:
        results, info = _compute(Path(job["model_dir"]), job["device"], ids_by_order, units, job["pad_id"],
                                 job["batch_size"], job["load"], job.get("infer"))
    except ValueError as e:
        (work / f"error{index}.json").write_text(json.dumps({"message": str(e)}))
        return 2
    np.savez(work / f"out{index}.npz", **{f"unit{k}": results[u] for k, u in enumerate(units)})
    (work / f"info{index}.json").write_text(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], int(sys.argv[2])))
