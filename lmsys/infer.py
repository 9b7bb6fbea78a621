"""Batched classifier inference: 3-way logits for token-id rows.

Two paths give the same logits up to rounding:
  padded   `predict_logits`: rows sorted by length (longest first), each batch padded only to its
           own longest row, so little compute goes to padding (2.7x the fixed padding of the recipe
           on the real length distribution, docs/recipe.md). `sort_by_length=False, pad_to=L` is the
           naive baseline (arrival order, every batch padded to L) kept for benchmarks.
  packed   lmsys.infer_packed: rows laid end to end in packs on flex attention, no padding at all
           (1.31x the padded path at Gemma-2-9B shape on an H200, benchmarks/RESULTS.md).
`route` picks one from params.yaml's `infer` section and the device: `packed: auto` takes the packed
path only on a CUDA card whose compute capability is in `infer.verified_capabilities` (where its
kernels were checked against the padded path), the padded path on the CPU and every other card; a
model the packed path cannot run (no decoder with a `score` head) stays padded. `classify` runs the
route; `predict_logits_resumable` is the same computation in shards saved as they finish, so a
killed job resumes at its last finished shard.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmsys import distributed
from lmsys.io import atomic_path, write_json

log = logging.getLogger(__name__)


def pad_batch(rows: list[list[int]], pad_id: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows -> (input_ids [B, T], attention_mask [B, T]), T = pad_to or the longest
    row. Raises ValueError for an empty row or one longer than pad_to."""
    longest = max(len(r) for r in rows)
    if min(len(r) for r in rows) == 0:
        raise ValueError("cannot classify an empty token row")
    width = longest if pad_to is None else pad_to
    if longest > width:
        raise ValueError(f"row of {longest} tokens is longer than pad_to={pad_to}")
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict_logits(model: torch.nn.Module, ids: list[list[int]], pad_id: int, batch_size: int,
                   device: str | torch.device | None = None, progress_every: int | None = None,
                   desc: str = "infer", sort_by_length: bool = True, pad_to: int | None = None) -> np.ndarray:
    """Logits [N, 3] float32 of `model` on `ids`, in input order.

    device defaults to the model's; the model is put in eval mode and run under inference_mode.
    progress_every=N also logs a line every N batches (for batch logs without a tty).
    Raises ValueError for batch_size < 1, an empty row, or a row longer than pad_to."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(ids)
    if n == 0:
        return np.zeros((0, 3), dtype=np.float32)
    device = torch.device(device) if device is not None else model_device(model)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=n)
    # longest first: the first batch shows at once whether the largest shapes fit in memory
    order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(n)
    out = np.empty((n, 3), dtype=np.float32)
    n_batches = (n + batch_size - 1) // batch_size
    model.eval()
    t0, done = time.perf_counter(), 0   # own row count: a disabled tqdm (TQDM_DISABLE=1) keeps bar.n at 0
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="row", leave=False) as bar:
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            input_ids, mask = pad_batch([ids[i] for i in idx], pad_id, pad_to)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            out[idx] = logits.float().cpu().numpy()  # scatter back to input positions
            bar.update(len(idx))
            done += len(idx)
            if progress_every and ((b + 1) % progress_every == 0 or b + 1 == n_batches):
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info("%s: batch %d/%d, %d/%d rows, %.1f rows/s, eta %.0f s", desc, b + 1,
                         n_batches, done, n, rate, (n - done) / rate)
    return out


# ---------------------------------------------------------------- which path

@dataclass(frozen=True)
class Route:
    """The inference path of one model on one device, and why (logged and put in step metrics)."""
    packed: bool
    pack_tokens: int
    reason: str

    def describe(self) -> str:
        return f"{'packed' if self.packed else 'padded'} ({self.reason})"


PADDED = Route(False, 0, "padded path asked for")


def route(model: torch.nn.Module, settings: dict, device: str | torch.device | None = None) -> Route:
    """The path `model` takes on `device` (default: the model's) under params.yaml's `infer` section
    (`settings`: packed auto | true | false, pack_tokens, verified_capabilities). Raises TypeError
    for `packed: true` on a model the packed path cannot run."""
    from lmsys.devices import capability, capability_text
    from lmsys.infer_packed import is_decoder_classifier
    mode, tokens = settings["packed"], int(settings["pack_tokens"])
    if mode is False:
        return Route(False, 0, "infer.packed false")
    decoder = is_decoder_classifier(model)
    if mode is True:
        if not decoder:
            raise TypeError(f"infer.packed true: the packed path needs a decoder classifier with a `score` head, "
                            f"got {type(model).__name__}; set infer.packed auto or false")
        return Route(True, tokens, "infer.packed true")
    device = torch.device(device) if device is not None else model_device(model)
    cap = capability_text(capability(device))
    verified = [str(c) for c in settings["verified_capabilities"]]
    if not cap:
        return Route(False, 0, f"infer.packed auto: {device.type}, not a CUDA GPU")
    if cap not in verified:
        return Route(False, 0, f"infer.packed auto: compute capability {cap} is not in infer.verified_capabilities {verified}")
    if not decoder:
        return Route(False, 0, f"infer.packed auto: {type(model).__name__} is not a decoder classifier")
    return Route(True, tokens, f"infer.packed auto: compute capability {cap} verified")


def classify(model: torch.nn.Module, ids: list[list[int]], pad_id: int, batch_size: int, path: Route = PADDED,
             progress_every: int | None = None, desc: str = "infer") -> np.ndarray:
    """Logits [N, 3] float32 of `model` on `ids`, in input order, on `path`: predict_logits (batches of
    batch_size) or, packed, predict_logits_packed on flex attention with every pack exactly
    path.pack_tokens long (one shape: its kernels compile once, whatever the rows)."""
    if not path.packed:
        return predict_logits(model, ids, pad_id, batch_size, progress_every=progress_every, desc=desc)
    from lmsys.infer_packed import flex_attention, predict_logits_packed
    with flex_attention(model):
        return predict_logits_packed(model, ids, pad_id, max_tokens=path.pack_tokens, progress_every=progress_every,
                                     desc=desc, fixed_length=True)


# ---------------------------------------------------------------- non-finite guard

class NonFiniteLogits(ValueError):
    """Rows whose logits are not finite and could not be recomputed; the message ends with the fix."""


def predict_logits_guarded(model: torch.nn.Module, ids: list[list[int]], pad_id: int, batch_size: int,
                           fp32_model=None, desc: str = "infer", path: Route = PADDED) -> tuple[np.ndarray, dict]:
    """(logits [N, 3] as predict_logits, info) where no row is left non-finite: a half-precision model can
    overflow (float16's largest value is 65504) where float32 does not. The non-finite rows are counted
    and recomputed one at a time (batch 1, so the result does not depend on which rows shared a batch)
    by fp32_model() (a callable giving the model in float32, called at most once); without one, or when a
    row is still non-finite in float32, NonFiniteLogits is raised: nothing non-finite is returned.
    The rows go on `path` (classify); the float32 recomputation is padded.
    info: nonfinite_rows, recomputed_fp32."""
    z = classify(model, ids, pad_id, batch_size, path, desc=desc)
    bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
    info = {"nonfinite_rows": int(len(bad)), "recomputed_fp32": 0}
    if not len(bad):
        return z, info
    dtype = next(model.parameters()).dtype
    what = f"{desc}: {len(bad)} of {len(ids)} rows give non-finite logits in {str(dtype).removeprefix('torch.')}"
    broken = "fix: the model's weights are broken: rerun steps 6-7 and check their logs"
    if fp32_model is None:
        fix = broken if dtype == torch.float32 else ("fix: serve.nonfinite recompute (those rows in float32), or "
                                                     "serve the model in bfloat16/float32 (serve.cards, serve.dtype)")
        raise NonFiniteLogits(f"{what} (first rows: {bad[:5].tolist()}); {fix}")
    log.warning("%s: recomputing them in float32", what)
    m32 = fp32_model()
    for i in bad:
        z[i] = predict_logits(m32, [ids[i]], pad_id, 1, desc=f"{desc} fp32")[0]
    still = bad[~np.isfinite(z[bad]).all(axis=1)]
    if len(still):
        raise NonFiniteLogits(f"{what}, and {len(still)} of them in float32 too (first rows: {still[:5].tolist()}); "
                              f"{broken}")
    info["recomputed_fp32"] = int(len(bad))
    return z, info


# ---------------------------------------------------------------- resumable, sharded

SHARD_MANIFEST = "manifest.json"


def _shard_fingerprint(ids: list[list[int]], pad_id: int, batch_size: int, shard_rows: int, key: str,
                       path: Route) -> str:
    """What the shards in a work dir were computed from: the token rows, padding, batch and shard
    size, the path (packed or padded, pack length) and the caller's key (the model's identity)."""
    import hashlib
    h = hashlib.sha256(json.dumps([pad_id, batch_size, shard_rows, key, path.packed, path.pack_tokens]).encode())
    for row in ids:
        h.update(np.asarray(row, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def _open_work_dir(work_dir: Path, fingerprint: str) -> None:
    """Keep work_dir's shards when they were made from the same fingerprint, else start it empty."""
    manifest = work_dir / SHARD_MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    write_json({"fingerprint": fingerprint}, manifest)


def predict_logits_resumable(model: torch.nn.Module, ids: list[list[int]], pad_id: int, batch_size: int,
                             work_dir: str | Path, shard_rows: int = 4096, key: str = "",
                             progress_every: int | None = None, desc: str = "infer",
                             path: Route = PADDED) -> tuple[np.ndarray, dict]:
    """(logits [N, 3] float32 in input order, info) like classify on `path`, computed in shards so that
    a killed job resumes where it stopped.

    The rows are sorted by length (longest first, as predict_logits does) and cut into shards of
    shard_rows rows, rounded up to a multiple of batch_size, so on the padded path each shard is a run
    of whole batches of predict_logits' own order: the logits equal predict_logits' bit for bit. Each
    shard is computed on its own (on the packed path: packed by itself), so a resumed run's logits equal
    an uninterrupted one's. Each finished shard is saved atomically as work_dir/shard-NNNNN.npy; a rerun
    with the same rows, pad id, batch size, shard size, path and `key` (name the model: e.g. its
    adapter's content hash) loads the finished shards and computes only the rest; anything else in
    work_dir is discarded first. The caller removes work_dir after writing its output.
    Data-parallel (inside lmsys.distributed ranks): the shards still to compute are dealt to the ranks
    by tokens (whole shards, each written by the rank that computed it: the bytes one process writes);
    every rank then reads all of them and returns the full logits.
    info: shards, shards_resumed, rows. Raises ValueError for batch_size or shard_rows < 1 (and as
    predict_logits)."""
    if batch_size < 1 or shard_rows < 1:
        raise ValueError(f"batch_size and shard_rows must be >= 1, got {batch_size}, {shard_rows}")
    work_dir = Path(work_dir)
    per_shard = -(-shard_rows // batch_size) * batch_size
    n = len(ids)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    if distributed.is_main():
        _open_work_dir(work_dir, _shard_fingerprint(ids, pad_id, batch_size, per_shard, key, path))
    distributed.barrier()                      # the work dir is settled before any rank looks into it
    n_shards = -(-n // per_shard)
    shard = lambda s: order[s * per_shard:(s + 1) * per_shard]             # noqa: E731  (row indices of shard s)
    shard_file = lambda s: work_dir / f"shard-{s:05d}.npy"                   # noqa: E731
    todo = distributed.all_objects([s for s in range(n_shards) if not shard_file(s).exists()])[0]   # rank 0's view
    resumed = n_shards - len(todo)
    mine = distributed.deal([int(lengths[shard(s)].sum()) for s in todo], distributed.world())[distributed.rank()]
    for s in sorted(todo[i] for i in mine):
        z = classify(model, [ids[i] for i in shard(s)], pad_id, batch_size, path, progress_every=progress_every,
                     desc=f"{desc} shard {s + 1}/{n_shards}")
        with atomic_path(shard_file(s)) as tmp, open(tmp, "wb") as f:
            np.save(f, z)
    distributed.barrier()                      # every rank's shards are written
    out = np.empty((n, 3), dtype=np.float32)
    for s in range(n_shards):
        out[shard(s)] = np.load(shard_file(s))
    if resumed:
        log.warning("%s: resumed %d of %d shards from %s", desc, resumed, n_shards, work_dir)
    return out, {"shards": n_shards, "shards_resumed": resumed, "rows": n}
