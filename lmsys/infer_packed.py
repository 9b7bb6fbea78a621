"""Packed classifier inference: rows laid end to end in fixed-length packs, no padding between them.

`predict_logits` (lmsys.infer) pads every batch to its longest row; here the rows of many batches
go into packs of one common length T (a multiple of 128, at most `max_tokens`), each row with
its own positions 0..len-1 and an attention mask that keeps every row to itself (block-diagonal
causal). The decoder runs once per pack ([1, T]); each row's logits come from its last non-pad
token, exactly as the model's own sequence-classification pooling picks it, through the model's
own head. Results equal `predict_logits` up to rounding, in input order.

Attention, by the model's `config._attn_implementation`:
  flex_attention   the fast path (GPU): a BlockMask built here from the row boundaries (blocks
                   outside every row are skipped; Gemma-2's sliding-window layers get their own),
                   and transformers' flex kernel, which applies Gemma-2's attention soft-capping.
  eager, sdpa, flash_attention_*
                   transformers' own packed-sequence masks (position_ids that restart at 0 mark
                   the rows; attention_mask=None); eager and sdpa build a T x T mask, so keep
                   max_tokens small there (tests, CPU).
Packs have one shape, so `compiled_layers` (regional torch.compile of the decoder layers)
compiles once per layer kind and is reused for every pack. `PackedForward` (one pack through the
model) is also what the trainer's padding-free micro-batches run (lmsys.train, trainer.packing).

Supports decoder classifiers of the transformers `GenericForSequenceClassification` layout
(base model under `base_model_prefix`, linear `score` head): Llama, Qwen2, Gemma-2, ...; a peft
wrapper is unwrapped (LoRA layers and the saved head are used as they are).
"""
from __future__ import annotations

import contextlib
import heapq
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK = 128  # flex attention's sparse block; pack lengths are multiples of it


# ---------------------------------------------------------------- packing plan (host)

def _fits(lengths: np.ndarray, order: np.ndarray, n_packs: int, cap: int) -> list[list[int]] | None:
    """Worst-fit decreasing into n_packs of capacity cap (rows in `order`, longest first):
    each row goes to the emptiest pack. None when a row does not fit."""
    heap = [(0, p) for p in range(n_packs)]  # (used, pack)
    packs: list[list[int]] = [[] for _ in range(n_packs)]
    for i in order:
        used, p = heapq.heappop(heap)
        if used + lengths[i] > cap:
            return None
        packs[p].append(int(i))
        heapq.heappush(heap, (used + int(lengths[i]), p))
    return packs


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan_packs(lengths, max_tokens: int, multiple: int = BLOCK,
               fixed_length: bool = False) -> tuple[list[np.ndarray], int]:
    """Row indices per pack and the common pack length T (a multiple of `multiple`, <= max_tokens
    rounded up to it). Uses the fewest packs that hold all rows and the smallest T for that count,
    so the padding left at pack ends is small; rows are longest first inside a pack.
    fixed_length=True makes T always max_tokens rounded up (one shape for every data set: a
    compiled model never recompiles; costs the padding of the last, partly filled pack).
    Raises ValueError for an empty row or a row longer than max_tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return [], 0
    if lengths.min() < 1:
        raise ValueError("cannot classify an empty token row")
    cap_max = _round_up(max_tokens, multiple)
    if lengths.max() > max_tokens:
        raise ValueError(f"row of {int(lengths.max())} tokens is longer than max_tokens={max_tokens}")
    order = np.argsort(-lengths, kind="stable")
    total = int(lengths.sum())
    n = max(1, -(-total // cap_max))
    while True:
        cap = max(_round_up(-(-total // n), multiple), _round_up(int(lengths.max()), multiple))
        if fixed_length:
            cap = cap_max
        while cap <= cap_max:
            packs = _fits(lengths, order, n, cap)
            if packs is not None:
                packs = [np.asarray(p, dtype=np.int64) for p in packs if p]
                return packs, (cap_max if fixed_length else cap)
            cap += multiple
        n += 1


@dataclass
class Pack:
    rows: np.ndarray        # row indices (input order positions) in this pack, in pack order
    input_ids: np.ndarray   # [T] int64
    position_ids: np.ndarray  # [T] int64, restarting at 0 for every row (and for the tail)
    doc_ids: np.ndarray     # [T] int64, non-decreasing: row k of the pack -> k, tail -> len(rows)
    last: np.ndarray        # [len(rows)] int64, the token each row's logits are read from


def pooled_index(row, pool_pad_id: int | None) -> int:
    """The model's pooling token of one row: its last token that is not the pad id (the first
    token when every token is; the last token when the model has no pad id)."""
    if pool_pad_id is None:
        return len(row) - 1
    for k in range(len(row) - 1, -1, -1):
        if row[k] != pool_pad_id:
            return k
    return 0


def build_pack(ids: list[list[int]], rows: np.ndarray, T: int, pad_id: int, pool_pad_id: int | None) -> Pack:
    input_ids = np.full(T, pad_id, dtype=np.int64)
    position_ids = np.empty(T, dtype=np.int64)
    doc_ids = np.empty(T, dtype=np.int64)
    last = np.empty(len(rows), dtype=np.int64)
    at = 0
    for k, i in enumerate(rows):
        r = ids[i]
        n = len(r)
        input_ids[at:at + n] = r
        position_ids[at:at + n] = np.arange(n)
        doc_ids[at:at + n] = k
        last[k] = at + pooled_index(r, pool_pad_id)
        at += n
    if at > T:
        raise ValueError(f"pack of {at} tokens is longer than T={T}")
    position_ids[at:] = np.arange(T - at)
    doc_ids[at:] = len(rows)
    return Pack(np.asarray(rows), input_ids, position_ids, doc_ids, last)


# ---------------------------------------------------------------- flex masks (device)

class PackedFlexMasks:
    """BlockMasks for packs of length up to T (a multiple of the block): causal inside each row,
    nothing across rows, and for sliding-window layers also q - kv < window (transformers' sliding rule).

    The mask functions close over one persistent doc-id buffer of T tokens that `masks()` overwrites
    (a shorter pack uses its start), so the same function objects serve every pack, whatever its
    length (compiled code sees no new closures: no recompiles for them)."""

    def __init__(self, T: int, device, sliding_window: int | None = None, block: int = BLOCK):
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401 (fail early if missing)
        if T % block:
            raise ValueError(f"pack length {T} is not a multiple of the block {block}")
        self.T, self.block, self.window = T, block, sliding_window
        self.doc = torch.zeros(T, dtype=torch.long, device=device)
        doc = self.doc

        def causal_doc(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        self.mask_mods = {"full_attention": causal_doc}
        if sliding_window is not None:
            w = int(sliding_window)

            def sliding_doc(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < w)

            self.mask_mods["sliding_attention"] = sliding_doc

    def _block_mask(self, mask_mod, dmin, dmax, window):
        from torch.nn.attention.flex_attention import BlockMask
        nb, B = len(dmin), self.block
        i = torch.arange(nb, device=dmin.device)[:, None]
        j = torch.arange(nb, device=dmin.device)[None, :]
        # doc ids are non-decreasing, so a block holds the docs dmin..dmax
        share = (dmax[None, :] >= dmin[:, None]) & (dmin[None, :] <= dmax[:, None])
        single = dmin == dmax
        any_ = (j <= i) & share
        full = (j < i) & single[:, None] & single[None, :] & (dmin[:, None] == dmin[None, :])
        if window is not None:
            any_ &= (i - j) * B - (B - 1) < window       # the closest pair is inside the window
            full &= (i - j) * B + (B - 1) < window       # the farthest pair too
        partial = any_ & ~full

        def ordered(dense):
            num = dense.sum(-1, dtype=torch.int32)
            idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
            return num[None, None], idx[None, None]

        kv_num, kv_idx = ordered(partial)
        full_num, full_idx = ordered(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=B,
                                        mask_mod=mask_mod, seq_lengths=(nb * B, nb * B))

    def masks(self, doc_ids: torch.Tensor) -> dict:
        """{layer type: BlockMask} for one pack (doc_ids [t] on the mask's device, t <= T a multiple of
        the block). Raises ValueError for another length."""
        t = len(doc_ids)
        if t > self.T or t % self.block:
            raise ValueError(f"pack of {t} tokens: masks serve multiples of {self.block} up to {self.T}")
        self.doc[:t].copy_(doc_ids)
        d = self.doc[:t].view(-1, self.block)
        dmin, dmax = d[:, 0], d[:, -1]
        out = {"full_attention": self._block_mask(self.mask_mods["full_attention"], dmin, dmax, None)}
        if "sliding_attention" in self.mask_mods:
            out["sliding_attention"] = self._block_mask(self.mask_mods["sliding_attention"], dmin, dmax,
                                                        self.window)
        return out


# ---------------------------------------------------------------- the model's parts

def classifier_parts(model: torch.nn.Module):
    """(classifier, decoder, head) of a GenericForSequenceClassification-style model, a peft
    wrapper unwrapped. Raises TypeError for other layouts (e.g. BERT)."""
    cls = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(cls, "base_model_prefix", None)
    decoder = getattr(cls, prefix, None) if prefix else None
    head = getattr(cls, "score", None)
    if decoder is None or head is None or not hasattr(decoder, "layers"):
        raise TypeError(f"packed inference and training (trainer.packing) need a decoder classifier with a "
                        f"`score` head, got {type(cls).__name__}")
    return cls, decoder, head


def _layer_types(config) -> set[str]:
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not types <= {"full_attention", "sliding_attention"}:
        raise NotImplementedError(f"packed flex masks support full and sliding attention layers, got {types}")
    return types


def is_decoder_classifier(model: torch.nn.Module) -> bool:
    """Can the packed path run `model` (classifier_parts finds a decoder and a `score` head)?"""
    try:
        classifier_parts(model)
    except TypeError:
        return False
    return True


@contextlib.contextmanager
def flex_attention(model: torch.nn.Module):
    """The model on transformers' flex attention inside the block (the packed path's GPU kernels:
    BlockMasks from the row boundaries, Gemma-2's soft-capping in the kernel), its own attention
    implementation back on exit."""
    cls, _, _ = classifier_parts(model)
    before = cls.config._attn_implementation
    if before != "flex_attention":
        cls.set_attn_implementation("flex_attention")
    try:
        yield model
    finally:
        if before != "flex_attention":
            cls.set_attn_implementation(before)


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, **compile_kwargs):
    """Regional compilation: torch.compile each decoder layer (identical layers share the
    compiled code; Gemma-2's sliding and global layers compile once each). Undone on exit."""
    _, decoder, _ = classifier_parts(model)
    layers = list(decoder.layers)
    for layer in layers:
        layer.compile(**compile_kwargs)
    try:
        yield model
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def training_attention(model: torch.nn.Module, device) -> str:
    """The attention implementation packed training runs with: on CUDA, flex attention in place of
    eager or sdpa (their packed masks are dense T x T; flex skips the blocks between rows and applies
    Gemma-2's soft-capping); elsewhere, and for flash attention (packed through the position ids),
    the model's own."""
    impl = classifier_parts(model)[0].config._attn_implementation
    return "flex_attention" if torch.device(device).type == "cuda" and impl in ("eager", "sdpa") else impl


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, impl: str):
    """Within it, the model runs attention `impl` (transformers' set_attn_implementation); its own
    afterwards. Nothing changes when it already runs `impl`."""
    cls = classifier_parts(model)[0]
    before = cls.config._attn_implementation
    if impl == before:
        yield model
        return
    cls.set_attn_implementation(impl)
    try:
        yield model
    finally:
        cls.set_attn_implementation(before)


# ---------------------------------------------------------------- one pack through the model

class PackedForward:
    """The classifier run on one pack at a time ([1, T]): what predict_logits_packed (under
    inference_mode) and the trainer's packed micro-batches (lmsys.train, with gradients) share.

    `logits(ids, rows, T)` lays rows `rows` of `ids` end to end in a pack of T tokens (build_pack),
    runs the decoder with position ids restarting at every row and attention confined to each row,
    and returns the head's logits [len(rows), num_labels] read at each row's pooling token, in the
    order of `rows`. The mask, by the model's attention implementation at construction:
      flex_attention   BlockMasks from the row boundaries (one PackedFlexMasks for every pack: T a
                       multiple of BLOCK, at most max_tokens rounded up to it, default the first T);
      eager, sdpa, flash_attention_*
                       none passed: attention_mask=None, use_cache=False and the restarting position
                       ids are what make transformers build its packed-sequence mask (with an
                       attention mask or a cache it silently lets the rows attend to each other).
    Raises TypeError for a model that is not a decoder classifier, NotImplementedError for another
    attention implementation."""

    def __init__(self, model: torch.nn.Module, pad_id: int, device: str | torch.device | None = None,
                 attn_kwargs: dict | None = None, max_tokens: int | None = None):
        self.cls, self.decoder, self.head = classifier_parts(model)
        config = self.cls.config
        self.impl = config._attn_implementation
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id, self.attn_kwargs = pad_id, attn_kwargs or {}
        self.pool_pad = config.get_text_config().pad_token_id if hasattr(config, "get_text_config") else config.pad_token_id
        self.num_labels = config.num_labels
        if self.impl == "flex_attention":
            types = _layer_types(config)
            self.window = getattr(config, "sliding_window", None) if "sliding_attention" in types else None
            self.single_mask = types == {"full_attention"}
            self.flex = PackedFlexMasks(_round_up(max_tokens, BLOCK), self.device, self.window) if max_tokens else None
        elif self.impl not in ("eager", "sdpa") and not str(self.impl).startswith("flash_attention"):
            raise NotImplementedError(f"packed batches have no mask for attn_implementation={self.impl!r}")

    @property
    def block(self) -> int:
        """What a pack's length must be a multiple of: flex attention's block, else any length."""
        return BLOCK if self.impl == "flex_attention" else 1

    def logits(self, ids: list[list[int]], rows: np.ndarray, T: int) -> torch.Tensor:
        p = build_pack(ids, rows, T, self.pad_id, self.pool_pad)
        input_ids = torch.from_numpy(p.input_ids)[None].to(self.device, non_blocking=True)
        position_ids = torch.from_numpy(p.position_ids)[None].to(self.device, non_blocking=True)
        attention_mask = None
        if self.impl == "flex_attention":
            if self.flex is None:
                self.flex = PackedFlexMasks(T, self.device, self.window)
            masks = self.flex.masks(torch.from_numpy(p.doc_ids).to(self.device, non_blocking=True))
            attention_mask = masks["full_attention"] if self.single_mask else masks
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **self.attn_kwargs).last_hidden_state[0]        # [T, hidden]
        return self.head(hidden.index_select(0, torch.from_numpy(p.last).to(self.device)))     # [len(rows), C]


# ---------------------------------------------------------------- inference

def predict_logits_packed(model: torch.nn.Module, ids: list[list[int]], pad_id: int, max_tokens: int = 8192,
                          device: str | torch.device | None = None, progress_every: int | None = None,
                          desc: str = "infer-packed", attn_kwargs: dict | None = None,
                          fixed_length: bool = False) -> np.ndarray:
    """Logits [N, 3] float32 of `model` on `ids`, in input order (see the module docstring).

    max_tokens: the most tokens in one pack (>= the longest row). pad_id fills pack ends.
    fixed_length: every pack exactly max_tokens long (see plan_packs).
    attn_kwargs: extra keyword arguments for the attention function (e.g. flex `kernel_options`).
    Raises ValueError for an empty row or one longer than max_tokens, TypeError for a model
    that is not a decoder classifier."""
    n = len(ids)
    if n == 0:
        return np.zeros((0, 3), dtype=np.float32)
    forward = PackedForward(model, pad_id, device, attn_kwargs)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=n)
    packs_rows, T = plan_packs(lengths, max_tokens, fixed_length=fixed_length)
    out = np.empty((n, forward.num_labels), dtype=np.float32)
    model.eval()
    t0 = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for b, rows in enumerate(packs_rows):
            out[rows] = forward.logits(ids, rows, T).float().cpu().numpy()
            done += len(rows)
            if progress_every and ((b + 1) % progress_every == 0 or b + 1 == len(packs_rows)):
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info("%s: pack %d/%d (T=%d), %d/%d rows, %.1f rows/s", desc, b + 1, len(packs_rows),
                         T, done, n, rate)
    return out


def pack_stats(lengths, max_tokens: int, fixed_length: bool = False) -> dict:
    """Packs, pack length and padding share of a plan (no model)."""
    packs, T = plan_packs(lengths, max_tokens, fixed_length=fixed_length)
    real = int(np.sum(lengths))
    return {"packs": len(packs), "pack_tokens": T, "real_tokens": real,
            "computed_tokens": len(packs) * T, "padding_share": 1 - real / max(len(packs) * T, 1)}
