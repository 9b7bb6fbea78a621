"""The serving target: the cards the final model is served on, and the dtype that follows from them.

Steps 6 and 7 run where training ran (a bf16-capable cluster), but the model is served elsewhere: the
competition scored an offline notebook on 2xT4 (compute capability 7.5, no bf16 tensor cores; gptqmodel's
Marlin kernel refuses bf16 there). So the served dtype comes from the target, never from the device that
happens to merge:

  serve.cards   "2xT4", "1xH200", "T4" ... (a card of lmsys.cards.CARDS, optionally N x); null: the device the step
                runs on (a CPU: float32, as the tiny profile always ran)
  serve.dtype   auto: float16 below compute capability 8.0, bfloat16 from 8.0, float32 on a CPU; or
                float16 | bfloat16 | float32 (bfloat16 for a card below 8.0 is refused)

Step 6 casts the merged model to that dtype once and records it in serving.json beside the weights
(`record`); step 7 quantises in it and copies the record; predict checks it on reload (`load_dtype`): the
weights on disk must be in the recorded dtype, and a device that cannot run it (bf16 below 8.0) gets
the model cast to float16, with a warning saying so. Training keeps bf16 (fp16 training would need loss
scaling): lmsys.steps.common.dtype().

torch is imported inside the functions: listing steps and `lmsys plan` must not pay for it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lmsys.cards import BF16_FROM, CARDS, parse_cards

RECORD = "serving.json"
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Target:
    cards: str | None                    # as written in serve.cards, None: the device the step runs on
    count: int                           # number of cards (1 for a device)
    capability: tuple[int, int] | None   # None: a CPU
    dtype: str                           # one of DTYPES
    why: str                             # how the dtype was decided, for logs and serving.json


def device_capability(device=None) -> tuple[int, int] | None:
    """Compute capability of CUDA `device` (default: the first visible one), None for a CPU or without a
    GPU. The tests patch this to stand for a T4 or an A100."""
    import torch
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device if device is not None else 0))


def resolve_dtype(requested: str, capability: tuple[int, int] | None, where: str) -> tuple[str, str]:
    """(dtype, why) for serve.dtype `requested` on a target of `capability` (None: a CPU) named `where`."""
    if requested == "auto":
        if capability is None:
            return "float32", f"{where}: a CPU: float32 (bf16/fp16 matmuls are slow and lossy there)"
        cc = ".".join(map(str, capability))
        if tuple(capability) < BF16_FROM:
            return "float16", f"{where}: compute capability {cc} < 8.0 (no bf16 tensor cores): float16"
        return "bfloat16", f"{where}: compute capability {cc} >= 8.0: bfloat16"
    if requested not in DTYPES:
        raise ValueError(f"serve.dtype {requested!r}: expected auto or one of {', '.join(DTYPES)}")
    if requested == "bfloat16" and capability is not None and tuple(capability) < BF16_FROM:
        raise ValueError(f"serve.dtype bfloat16 but {where} has compute capability {'.'.join(map(str, capability))} "
                         "< 8.0 (no bf16 tensor cores; Marlin refuses bf16 there): set serve.dtype auto or float16")
    return requested, f"{where}: serve.dtype {requested}"


def serving_target(cfg: dict) -> Target:
    """The target of cfg's `serve` section (see the module docstring)."""
    s = cfg["serve"]
    if s["cards"]:
        count, name = parse_cards(s["cards"])
        capability, where = CARDS[name], f"serve.cards {s['cards']}"
    else:
        count, capability = 1, device_capability()
        where = "this device (serve.cards null)"
    dtype, why = resolve_dtype(s["dtype"], capability, where)
    return Target(s["cards"], count, capability, dtype, why)


def torch_dtype(name: str):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- serving.json

def record(target: Target, **extra) -> dict:
    """What serving.json holds: the target, its dtype and how it was decided (+ `extra`)."""
    out = {k: v for k, v in asdict(target).items()}
    out["capability"] = list(target.capability) if target.capability else None
    return {**out, **extra}


def read_record(model_dir: str | Path) -> dict:
    """serving.json of a merged or quantized model dir. Raises FileNotFoundError naming the fix."""
    path = Path(model_dir) / RECORD
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: the model dir was made before its serving dtype was recorded; "
                                "rerun step 6 (`lmsys ensemble`) and step 7")
    return json.loads(path.read_text())


def head_dtype(model_dir: str | Path, head: str = "score.weight") -> str | None:
    """The dtype of tensor `head` in the dir's safetensors files ('float16', ...), None when absent."""
    from safetensors import safe_open
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    files = ([d / json.loads(index.read_text())["weight_map"][head]] if index.exists()
             and head in json.loads(index.read_text())["weight_map"] else sorted(d.glob("*.safetensors")))
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    for f in files:
        with safe_open(str(f), "pt") as st:
            if head in st.keys():
                return names.get(st.get_slice(head).get_dtype(), st.get_slice(head).get_dtype())
    return None


def check_weights(model_dir: str | Path, rec: dict) -> None:
    """Raise ValueError unless the dir's config and its `score` head are in the recorded dtype (a model
    dir edited or copied from another run would be served in a dtype nobody chose)."""
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype")
    head = head_dtype(d)
    if saved != rec["dtype"] or head not in (None, rec["dtype"]):
        raise ValueError(f"{d}: serving.json records {rec['dtype']} but config.json says {saved} and the score head "
                         f"is {head}: the weights are not the ones step 6/7 wrote; rerun them or export again")


def runnable(dtype: str, capability: tuple[int, int] | None) -> bool:
    """Whether a device of `capability` (None: a CPU, which runs all three) runs `dtype` natively."""
    return not (dtype == "bfloat16" and capability is not None and tuple(capability) < BF16_FROM)


def load_dtype(model_dir: str | Path, capability: tuple[int, int] | None) -> tuple[str, str | None]:
    """(dtype to load the model in, warning or None) on a device of `capability`: the recorded dtype,
    checked against the weights; float16 where the device cannot run bf16 (the warning says so)."""
    rec = read_record(model_dir)
    check_weights(model_dir, rec)
    if runnable(rec["dtype"], capability):
        return rec["dtype"], None
    cc = ".".join(map(str, capability))
    return "float16", (f"{model_dir}: the model was made for {rec['cards'] or 'a bf16 device'} in bfloat16, but this "
                       f"device (compute capability {cc}) has no bf16 tensor cores: loaded in float16 (non-finite "
                       "rows are recomputed in float32, serve.nonfinite); set serve.cards to this card and rerun "
                       "steps 6-7 to serve it as made")
