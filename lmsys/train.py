"""A generic, resumable classification trainer (post-pretraining, teachers, distillation).

One optimizer step = `grad_accum` micro-batches of `batch_size` rows, the last group of an epoch
possibly shorter; micro-batch losses are weighted by their share of the group's rows, so a step
equals one big batch. AdamW, cosine schedule with warmup, gradient clipping at 1.0.

Micro-batches (settings.packing): padded, each of the group's batches padded to its longest row
(PaddedBatches), or padding-free, the same group's rows re-cut into packs of at most pack_tokens
tokens laid end to end, one sequence per pack with attention kept inside each row (PackedBatches,
lmsys.infer_packed.PackedForward). Either way a step trains on the same rows with the same loss;
packing only stops computing padding (lmsys.token_model prices both).

out_dir layout:
  checkpoint/   every checkpoint_every steps (atomic): trainable.pt, optim.pt (optimizer,
                scheduler, every rank's RNG states), state.json (step, epoch, position, best, loss
                history, real and computed tokens)
  best/         lowest val log loss so far (model.save_pretrained)
  final/        best when val is given, else the last weights
  metrics.json  written last; the checkpoint is deleted after it

Entry: `train_classifier(model, rows, out_dir=..., settings=..., val=..., loss_fn=..., seed=..., desc=...)`;
the pipeline's steps call it through lmsys.steps.common.fit (build, encode, resumable work dir).

Data-parallel (inside the ranks of lmsys.distributed): each step's rows are dealt to the ranks by
tokens and each rank trains on its share; the trainable gradients are summed over the ranks before
the optimizer step (the loss of every micro-batch counts by its share of the step's rows on all
ranks, so the sum is the mean over the global batch). Rank 0 writes checkpoints, adapters and
metrics; each rank's RNG state goes into the checkpoint.

Resume: when checkpoint/ exists and was written by the same run (every setting but
checkpoint_every, the seed, the token ids, labels, soft targets, sample weights and the trainable
parameters' names and shapes), training continues exactly where it stopped (same data order: each
epoch's permutation comes from (seed, epoch)); a checkpoint of another run is discarded with a warning.

Sample weights are an array [N] or a dynamic object (e.g. lmsys.distill.EmaInfoGainWeights) with
batch(idx) -> [b] weights (read once a step, for all its rows, before its first forward),
observe(idx, probs [b, 3]) (after the step's forwards, every rank's rows), state_dict /
load_state_dict (saved in checkpoints) and fingerprint().
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lmsys import distributed
from lmsys.infer import model_device, pad_batch, predict_logits
from lmsys.infer_packed import PackedForward, attention_implementation, training_attention
from lmsys.io import atomic_dir, write_json
from lmsys.settings import TrainerSettings
from lmsys.token_model import first_fit

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                  tuple[torch.Tensor, dict]]


class DynamicWeights(Protocol):
    """Sample weights that depend on the student as it trains (see the module docstring)."""
    def __len__(self) -> int: ...
    def batch(self, idx: np.ndarray) -> np.ndarray: ...
    def observe(self, idx: np.ndarray, probs: np.ndarray) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def fingerprint(self) -> str: ...


# settings that do not change what a run computes: a checkpoint stays valid when they change
RESUME_NEUTRAL_KEYS = ("checkpoint_every",)


def is_dynamic(weight) -> bool:
    return weight is not None and hasattr(weight, "observe")


def cross_entropy_loss(logits, labels, soft_targets=None, sample_weight=None):
    """Default loss: (sample-weighted) mean cross-entropy on the hard labels. logits [B, 3]."""
    ce = F.cross_entropy(logits, labels, reduction="none")  # [B]
    loss = (ce * sample_weight).mean() if sample_weight is not None else ce.mean()
    return loss, {"ce": ce.detach().mean().item()}


def val_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Multiclass log loss and accuracy of logits [N, 3] against int labels [N]."""
    t = torch.tensor(np.asarray(logits, dtype=np.float32))     # copies: the arrays may be read-only views
    y = torch.tensor(np.asarray(labels, dtype=np.int64))
    return {"log_loss": float(F.cross_entropy(t, y)), "accuracy": float((t.argmax(1) == y).float().mean())}


# ---------------------------------------------------------------- the rows, the step count, the data order

@dataclass
class TrainSet:
    """What one run trains on: token ids and labels of N rows, and optionally per-row soft targets
    [N, n_teachers, 3] and sample weights ([N] or DynamicWeights), sliced per micro-batch for the loss."""
    ids: list[list[int]]
    labels: np.ndarray
    pad_id: int
    soft_targets: np.ndarray | None = None
    sample_weight: np.ndarray | DynamicWeights | None = None

    def __post_init__(self):
        n = len(self.ids)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.soft_targets is not None:
            self.soft_targets = np.asarray(self.soft_targets, dtype=np.float32)
        if self.sample_weight is not None and not is_dynamic(self.sample_weight):
            self.sample_weight = np.asarray(self.sample_weight, dtype=np.float32)
        for name in ("labels", "soft_targets", "sample_weight"):
            a = getattr(self, name)
            if a is not None and len(a) != n:
                raise ValueError(f"{name} has {len(a)} rows, ids {n}")


@dataclass
class ValSet:
    """The held-out rows a run is evaluated on (best checkpoint by their log loss)."""
    ids: list[list[int]]
    labels: np.ndarray


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a run takes, and of what."""
    batch_size: int         # rows per micro-batch
    grad_accum: int         # micro-batches per optimizer step
    steps_per_epoch: int
    total_steps: int        # settings.max_steps, else epochs x steps_per_epoch
    epochs: int             # epochs begun


def schedule(n: int, settings: TrainerSettings) -> Schedule:
    bs, accum = settings.batch_size, settings.grad_accum
    if n == 0:
        raise ValueError(f"nothing to train: n={n}, batch_size={bs}, grad_accum={accum}")
    groups = math.ceil(math.ceil(n / bs) / accum)  # optimizer steps per epoch
    total = settings.max_steps or settings.epochs * groups
    return Schedule(bs, accum, groups, total, math.ceil(total / groups))


def epoch_groups(n: int, epoch: int, seed: int, bs: int, accum: int) -> list[list[np.ndarray]]:
    """The epoch's row order, from its own seeded generator, cut into steps of micro-batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [order[i:i + bs] for i in range(0, n, bs)]
    return [batches[i:i + accum] for i in range(0, len(batches), accum)]


def _fingerprint(model, rows: TrainSet, settings: TrainerSettings, seed: int) -> str:
    """Identity of a run: a checkpoint resumes only the run that wrote it (its settings, including a
    section's loss settings; the rows, soft targets and weights; the trainable parameters)."""
    h = hashlib.sha256()
    kept = {k: v for k, v in settings.model_dump().items() if k not in RESUME_NEUTRAL_KEYS} | {"seed": seed}
    h.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for row in rows.ids:
        h.update(np.asarray(row, dtype=np.int64).tobytes() + b"|")
    h.update(rows.labels.tobytes())
    weight = rows.sample_weight
    for a in (rows.soft_targets, None if is_dynamic(weight) else weight):
        h.update(b"-" if a is None else a.tobytes())
    if is_dynamic(weight):
        h.update(f"{type(weight).__name__}:{weight.fingerprint()}".encode())
    h.update(json.dumps([(k, list(p.shape)) for k, p in model.named_parameters() if p.requires_grad]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- micro-batches: padded or packed

class PaddedBatches:
    """trainer.packing false: the group's micro-batches of batch_size rows as they are, each padded to
    its longest row (or to pad_to) and run with its attention mask."""

    def __init__(self, model, rows: TrainSet, device, pad_to: int | None = None):
        self.model, self.rows, self.device, self.pad_to = model, rows, device, pad_to

    def split(self, group: list[np.ndarray]) -> list[np.ndarray]:
        return list(group)

    def computed_tokens(self, idx: np.ndarray) -> int:
        return len(idx) * (self.pad_to or max(len(self.rows.ids[i]) for i in idx))

    def step(self):
        return contextlib.nullcontext()

    def logits(self, idx: np.ndarray) -> torch.Tensor:
        ids, mask = pad_batch([self.rows.ids[i] for i in idx], self.rows.pad_id, self.pad_to)     # [b, T] each
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits   # [b, 3]


class PackedBatches:
    """trainer.packing: an optimizer step's rows (its epoch_groups group, so the rows of the padded
    step) re-cut into packs of at most pack_tokens tokens (token_model.first_fit: the rule the plan
    prices), each pack one sequence [1, T] whose logits are read at each row's last token
    (infer_packed.PackedForward). T is the pack's real tokens, rounded up to flex attention's block
    where flex runs: on CUDA the step switches an eager/sdpa model to flex attention
    (infer_packed.training_attention), and back for evaluations. Raises ValueError when a row is
    longer than pack_tokens, TypeError for a model that is not a decoder classifier."""

    def __init__(self, model, rows: TrainSet, device, pack_tokens: int):
        self.model, self.rows, self.pack_tokens = model, rows, pack_tokens
        self.lengths = np.fromiter((len(r) for r in rows.ids), dtype=np.int64, count=len(rows.ids))
        if self.lengths.max() > pack_tokens:
            raise ValueError(f"a training row of {self.lengths.max()} tokens does not fit trainer.pack_tokens="
                             f"{pack_tokens}: raise pack_tokens to at least text.train_max_length")
        self.impl = training_attention(model, device)
        with self.step():
            self.forward = PackedForward(model, rows.pad_id, device, max_tokens=pack_tokens)
        self.device = self.forward.device

    def split(self, group: list[np.ndarray]) -> list[np.ndarray]:
        rows = np.concatenate(group)
        return [rows[p] for p in first_fit(self.lengths[rows], self.pack_tokens)]

    def computed_tokens(self, idx: np.ndarray) -> int:
        block = self.forward.block
        return -(-int(self.lengths[idx].sum()) // block) * block

    def step(self):
        """The attention implementation of a training step (evaluations run with the model's own)."""
        return attention_implementation(self.model, self.impl)

    def logits(self, idx: np.ndarray) -> torch.Tensor:
        return self.forward.logits(self.rows.ids, idx, self.computed_tokens(idx))              # [b, 3]


def rank_micro_batches(batches: PaddedBatches | PackedBatches, group: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """This process's micro-batches of one optimizer step. One process: batches.split(group). Ranks:
    the step's rows dealt to them by tokens (distributed.deal), this rank's share cut into micro-batches
    of batch_size rows (padded) or packs; a rank may get none when the step has fewer rows than ranks."""
    if distributed.world() == 1:
        return batches.split(group)
    step_rows = np.concatenate(group)
    lengths = np.fromiter((len(batches.rows.ids[i]) for i in step_rows), dtype=np.int64, count=len(step_rows))
    mine = step_rows[distributed.deal(lengths, distributed.world())[distributed.rank()]]
    return batches.split([mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]) if len(mine) else []


def micro_batches(model, rows: TrainSet, settings: TrainerSettings, device,
                  pad_to: int | None = None) -> PaddedBatches | PackedBatches:
    """The trainer's micro-batches under `settings` (packing or not). pad_to: padded only."""
    if not settings.packing:
        return PaddedBatches(model, rows, device, pad_to)
    if pad_to is not None:
        raise ValueError("pad_to pads micro-batches: set trainer.packing false to use it")
    return PackedBatches(model, rows, device, settings.pack_tokens)


# ---------------------------------------------------------------- checkpoints

def _rng_states() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_states(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, model, opt, lr_schedule, state: dict, weights: DynamicWeights | None = None) -> None:
    """Trainable weights, optimizer, scheduler, RNG (every rank's), dynamic-weight and loop state,
    swapped in atomically by rank 0 (every rank calls it). Only tensors and plain containers go into
    the .pt files (numpy arrays as tagged tensors), so load_checkpoint reads them with
    weights_only=True: no pickled object is ever executed."""
    rng = distributed.all_objects(_rng_states())                 # [rank 0's, rank 1's, ...]
    if not distributed.is_main():
        return
    with atomic_dir(path) as tmp:
        trainable = {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(_to_plain({"optimizer": opt.state_dict(), "scheduler": lr_schedule.state_dict(), "rng": rng,
                              "weights": weights.state_dict() if weights is not None else None}), tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state))


def _to_plain(obj):
    """numpy arrays -> {"__ndarray__": tensor, "dtype": str}, recursively (tuples stay tuples)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj.copy()),
                "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def _from_plain(obj):
    """Inverse of _to_plain."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy().astype(obj["dtype"])
        return {k: _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_plain(v) for v in obj)
    return obj


def load_checkpoint(path: Path, model, opt, lr_schedule, weights: DynamicWeights | None = None) -> dict:
    """Restore what save_checkpoint wrote; returns the loop state. Both .pt files are read with
    weights_only=True (a checkpoint folder may be writable by others): a file holding anything but
    tensors and plain containers raises pickle.UnpicklingError instead of running code."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in torch.load(path / "trainable.pt", map_location="cpu", weights_only=True).items():
            params[k].copy_(t)
    rest = _from_plain(torch.load(path / "optim.pt", map_location="cpu", weights_only=True))
    opt.load_state_dict(rest["optimizer"])
    lr_schedule.load_state_dict(rest["scheduler"])
    rng = rest["rng"] if isinstance(rest["rng"], list) else [rest["rng"]]       # one process wrote a dict
    _set_rng_states(rng[distributed.rank() % len(rng)])
    if weights is not None:
        weights.load_state_dict(rest["weights"])
    return json.loads((path / "state.json").read_text())


def _save_model(model, path: Path) -> None:
    """Rank 0 writes the adapter; every rank waits until it has."""
    if distributed.is_main():
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
    distributed.barrier()


# ---------------------------------------------------------------- one step, one evaluation

def _train_step(model, micro: list[np.ndarray], step_rows: np.ndarray, rows: TrainSet, loss_fn, opt, lr_schedule,
                batches: PaddedBatches | PackedBatches) -> tuple[float, dict]:
    """One optimizer step: the gradients of the step's rows (step_gradients; `micro` this process's
    micro-batches of them), clipped at 1.0, then AdamW and the schedule. Returns the loss and its parts."""
    loss, parts = step_gradients(model, micro, step_rows, rows, loss_fn, batches)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    lr_schedule.step()
    opt.zero_grad(set_to_none=True)
    return loss, parts


def step_gradients(model, micro: list[np.ndarray], step_rows: np.ndarray, rows: TrainSet, loss_fn,
                   batches: PaddedBatches | PackedBatches) -> tuple[float, dict]:
    """The gradients of the mean loss over one optimizer step's rows `step_rows` in every trainable
    parameter's .grad, on every rank: this process's micro-batches `micro` forward and backward (each
    micro-batch's loss, a mean over its rows, counts by its share of step_rows), then, with ranks, the
    gradients summed over them (a rank without rows adds zeros). Dynamic sample weights are read once
    for all of step_rows before the first forward, and then observe every rank's predictions, so every
    rank keeps the same weights. Returns the step's loss and its parts (summed over the ranks)."""
    weight_of = _step_weights(rows, step_rows)
    loss, parts, seen = 0.0, {}, []
    device = batches.device
    as_t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    for idx in micro:
        logits = batches.logits(idx).float()                                                    # [b, 3]
        labels = torch.as_tensor(rows.labels[idx], dtype=torch.long, device=device)
        soft = as_t(None if rows.soft_targets is None else rows.soft_targets[idx])
        part_loss, step_parts = loss_fn(logits, labels, soft, as_t(weight_of(idx)))
        if is_dynamic(rows.sample_weight):
            seen.append((idx, torch.softmax(logits.detach(), dim=-1).cpu().numpy()))
        share = len(idx) / len(step_rows)
        (part_loss * share).backward()
        loss += part_loss.item() * share
        for k, v in step_parts.items():
            parts[k] = parts.get(k, 0.0) + (v.item() if torch.is_tensor(v) else float(v)) * share
    if distributed.world() > 1:
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_sum([p.grad for p in trainable])
        loss, parts, seen = _summed(distributed.all_objects((loss, parts, seen)))
    for idx, probs in seen:
        rows.sample_weight.observe(idx, probs)
    return loss, parts


def _summed(per_rank: list[tuple[float, dict, list]]) -> tuple[float, dict, list]:
    """Every rank's (loss, parts, observations) of one step as one: losses and parts added, observations joined."""
    parts: dict = {}
    for _, p, _ in per_rank:
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v
    return sum(loss for loss, _, _ in per_rank), parts, [o for _, _, seen in per_rank for o in seen]


def _step_weights(rows: TrainSet, step_rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray | None]:
    """idx -> the sample weights [b] of rows idx in this step (None without weights). Dynamic weights
    are read once for all the step's rows, before its first forward: a step's weights do not depend
    on how it is cut into micro-batches (padded or packed)."""
    w = rows.sample_weight
    if w is None or not is_dynamic(w):
        return lambda idx: None if w is None else w[idx]
    at = dict(zip(step_rows.tolist(), w.batch(step_rows)))
    return lambda idx: np.array([at[i] for i in idx], dtype=np.float32)


def _evaluate(model, val: ValSet, pad_id: int, batch_size: int, step: int) -> dict:
    """Log loss and accuracy on the validation rows; with ranks each predicts the rows dealt to it
    by tokens and all of them get every row's logits (the same figures on every rank)."""
    if distributed.world() == 1:
        logits = predict_logits(model, val.ids, pad_id, batch_size, desc=f"val@{step}")
    else:
        mine = distributed.deal([len(r) for r in val.ids], distributed.world())[distributed.rank()]
        z = predict_logits(model, [val.ids[i] for i in mine], pad_id, batch_size, desc=f"val@{step}")
        logits = np.empty((len(val.ids), 3), dtype=np.float32)
        for idx, part in distributed.all_objects((mine, z)):
            logits[idx] = part
    model.train()
    return {"step": step, **val_metrics(logits, val.labels)}


# ---------------------------------------------------------------- the trainer

@dataclass
class Run:
    """One training run's state, in one object: what it trains on, its optimizer and schedule, where
    it writes, and `state` (step, epoch, position, best, history: what a checkpoint saves)."""
    model: object
    settings: TrainerSettings
    schedule: Schedule
    rows: TrainSet
    val: ValSet | None
    out_dir: Path
    opt: object
    lr_schedule: object
    state: dict

    @property
    def has_val(self) -> bool:
        return self.val is not None and len(self.val.ids) > 0

    @property
    def weights(self) -> DynamicWeights | None:
        """The dynamic sample weights (saved in checkpoints), if any."""
        return self.rows.sample_weight if is_dynamic(self.rows.sample_weight) else None

    def resume(self) -> int | None:
        """Load checkpoint/ into the run when it belongs to it; returns its step (None: a fresh start)."""
        ckpt = self.out_dir / "checkpoint"
        if not (ckpt / "state.json").exists():
            return None
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("fingerprint") != self.state["fingerprint"]:
            log.warning("ignoring %s: written by another run (other settings, data, targets, weights or model)", ckpt)
            distributed.barrier()                  # every rank has read it before rank 0 removes it
            if distributed.is_main():
                shutil.rmtree(ckpt, ignore_errors=True)
            return None
        self.state.update(load_checkpoint(ckpt, self.model, self.opt, self.lr_schedule, self.weights))
        log.info("resuming from %s at step %d (epoch %d)", ckpt, self.state["global_step"], self.state["epoch"])
        return self.state["global_step"]

    def record_step(self, loss: float, parts: dict, step_rows: np.ndarray, computed_tokens: int) -> None:
        """Count a finished optimizer step: its loss, and the real and computed tokens of all ranks."""
        state = self.state
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        state["losses"].append(loss)
        state["parts"].append(parts)
        state["real_tokens"] += int(sum(len(self.rows.ids[i]) for i in step_rows))
        state["computed_tokens"] += sum(distributed.all_objects(computed_tokens))

    def after_step(self) -> None:
        """Evaluate (keeping the best adapter), then checkpoint, when their intervals come up."""
        step, every = self.state["global_step"], self.settings.eval_every
        if self.has_val and every and step % every == 0:
            self.record_eval()
        every = self.settings.checkpoint_every
        if every and step % every == 0 and step < self.schedule.total_steps:
            save_checkpoint(self.out_dir / "checkpoint", self.model, self.opt, self.lr_schedule, self.state, self.weights)

    def record_eval(self) -> None:
        ev = _evaluate(self.model, self.val, self.rows.pad_id, self.schedule.batch_size, self.state["global_step"])
        self.state["evals"].append(ev)
        log.info("step %d: val log loss %.4f, accuracy %.3f", ev["step"], ev["log_loss"], ev["accuracy"])
        if self.state["best"] is None or ev["log_loss"] < self.state["best"]["log_loss"]:
            self.state["best"] = ev
            _save_model(self.model, self.out_dir / "best")

    def finish(self, resumed_from, rows_per_s, train_s) -> dict:
        """Final evaluation, final/ and metrics.json, then drop the checkpoint."""
        out_dir, state = self.out_dir, self.state
        if self.has_val:
            if not state["evals"] or state["evals"][-1]["step"] != state["global_step"]:
                self.record_eval()
            if distributed.is_main():
                with atomic_dir(out_dir / "final") as tmp:
                    shutil.copytree(out_dir / "best", tmp, dirs_exist_ok=True)
            _load_best_into(self.model, out_dir / "best")
        else:
            _save_model(self.model, out_dir / "final")
        metrics = _metrics(state, self.schedule, resumed_from, rows_per_s, train_s, len(self.rows.ids),
                           len(self.val.ids) if self.has_val else 0)
        if distributed.is_main():
            write_json(metrics, out_dir / "metrics.json")
            shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
        distributed.barrier()
        return metrics


def train_classifier(model, rows: TrainSet, *, out_dir: str | Path, settings: TrainerSettings,
                     val: ValSet | None = None, loss_fn: LossFn | None = None, seed: int = 0,
                     desc: str = "train", pad_to: int | None = None) -> dict:
    """Train `model` (a 3-label classifier, usually a PeftModel) on `rows` and return its metrics dict.

    settings: the section's TrainerSettings (lmsys.settings); with `val`, the best checkpoint by its
    log loss is kept (evaluated every settings.eval_every steps and at the end). loss_fn(logits,
    labels, soft, weight) -> (loss, parts), default cross-entropy. pad_to: pad every micro-batch to
    this many tokens (the recipe's fixed padding, a baseline for benchmarks, packing off; default: each
    micro-batch to its longest row). On return the model holds the final weights. Raises ValueError on
    an empty training set, or a row longer than settings.pack_tokens when packing."""
    run = _start(model, rows, Path(out_dir), settings, val, seed)
    resumed_from = run.resume()
    loss_fn, state, steps = loss_fn or cross_entropy_loss, run.state, run.schedule
    batches = micro_batches(model, rows, settings, model_device(model), pad_to)
    model.train()
    t0, done_rows = time.perf_counter(), 0
    # one bar, rank 0's; on rank 0 tqdm's own default decides (TQDM_DISABLE: lmsys.console)
    bar = tqdm(total=steps.total_steps, initial=state["global_step"], desc=desc, unit="step",
               **({} if distributed.is_main() else {"disable": True}))
    while state["global_step"] < steps.total_steps:
        groups = epoch_groups(len(rows.ids), state["epoch"], seed, steps.batch_size, steps.grad_accum)
        # on resume, skip the steps this epoch already consumed (same seeded order)
        for group in groups[state["step_in_epoch"]:]:
            step_rows = np.concatenate(group)
            micro = rank_micro_batches(batches, group, steps.batch_size)      # this rank's share of the step
            with batches.step():
                loss, parts = _train_step(model, micro, step_rows, rows, loss_fn, run.opt, run.lr_schedule, batches)
            run.record_step(loss, parts, step_rows, sum(batches.computed_tokens(idx) for idx in micro))
            done_rows += len(step_rows)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", rows_s=f"{done_rows / (time.perf_counter() - t0):.1f}")
            run.after_step()
            if state["global_step"] >= steps.total_steps:
                break
        else:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    bar.close()
    train_s = time.perf_counter() - t0
    return run.finish(resumed_from, done_rows / max(train_s, 1e-9), train_s)


def _start(model, rows: TrainSet, out_dir: Path, settings: TrainerSettings, val: ValSet | None, seed: int) -> Run:
    """Seed, and build the Run: optimizer, schedule, fresh state (fingerprinted)."""
    steps = schedule(len(rows.ids), settings)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed + distributed.rank())     # each rank its own dropout; rank 0 as one process
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, steps.total_steps)
    state = {"fingerprint": _fingerprint(model, rows, settings, seed), "global_step": 0, "epoch": 0,
             "step_in_epoch": 0, "best": None, "evals": [], "losses": [], "parts": [], "real_tokens": 0,
             "computed_tokens": 0}
    return Run(model, settings, steps, rows, val, out_dir, opt, lr_schedule, state)


def _load_best_into(model, best_dir: Path) -> None:
    """Put the best adapter's weights back into the in-memory PeftModel."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(best_dir), device=str(model_device(model))))


def _metrics(state, steps: Schedule, resumed_from, rows_per_s, train_s, n_train, n_val) -> dict:
    losses = state["losses"]
    tail = max(1, len(losses) // 10)  # the last 10% of steps
    stride = max(1, len(losses) // 50)  # at most ~50 curve points
    parts_tail = state["parts"][-tail:]
    best = state["best"] or {}
    return {
        "steps": state["global_step"], "epochs": steps.epochs, "n_train": n_train, "n_val": n_val,
        "train_loss_first": losses[0], "train_loss_last": float(np.mean(losses[-tail:])),
        "train_loss_curve": [[i + 1, losses[i]] for i in range(0, len(losses), stride)],
        "train_loss_parts_last": {k: float(np.mean([p[k] for p in parts_tail if k in p]))
                                  for k in (parts_tail[-1] if parts_tail else {})},
        "best_val_log_loss": best.get("log_loss"), "val_accuracy": best.get("accuracy"),
        "best_step": best.get("step"), "evals": state["evals"],
        "samples_per_s": rows_per_s, "train_seconds": train_s, "resumed_from_step": resumed_from,
        "real_per_computed_token": state["real_tokens"] / max(state["computed_tokens"], 1),
    }
