"""Distillation loss (recipe step 5) and optional information-gain sample weights.

Recipe loss, for teachers t = 1..n (e.g. Qwen, Llama):
    loss = (ce_w * CE + sum_t (kl_w * KL_t + cos_w * cos_t)) / (ce_w + n * (kl_w + cos_w))
with all weights 1 and two teachers this is the recipe's (CE + KL_q + cos_q + KL_l + cos_l) / 5.
  CE    cross entropy of the student logits against the hard label
  KL_t  KL(teacher || student) between softmax(z / T) of each, times T^2 (keeps gradient scale
        independent of T, Hinton et al.)
  cos_t 1 - cosine(p_student, p_teacher) on the same tempered probabilities (the cosine-embedding
        loss with target 1)
Per-sample weights multiply every per-sample term before the batch mean.

Information-gain weights (RLP-style, optional): r_i = log p_teacher(y_i) - log p_baseline(y_i),
how much better the teacher explains row i than a baseline: the class prior (fixed weights,
info_gain_weights) or an EMA of the student's own predictions (EmaInfoGainWeights, updated as the
student trains).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from lmsys.metrics import softmax


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: list[torch.Tensor],
                 T: float = 1.0, ce_weight: float = 1.0, kl_weight: float = 1.0, cos_weight: float = 1.0,
                 sample_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Scalar loss (differentiable in student_logits only; teachers are detached) and parts: floats
    ce, kl_<t>, cos_<t> (unweighted batch means, teacher index t) and loss.
    Shapes: student_logits [B, 3], labels [B] int, each teacher [B, 3], sample_weight [B] or None.
    Raises ValueError on shape mismatch, T <= 0, a negative loss weight or a zero denominator."""
    B = student_logits.shape[0]
    if student_logits.shape != (B, 3) or labels.shape != (B,):
        raise ValueError(f"student_logits must be [B, 3] and labels [B]; got {tuple(student_logits.shape)}, {tuple(labels.shape)}")
    if any(t.shape != student_logits.shape for t in teacher_logits):
        raise ValueError(f"every teacher must be [{B}, 3]; got {[tuple(t.shape) for t in teacher_logits]}")
    if T <= 0 or min(ce_weight, kl_weight, cos_weight) < 0:
        raise ValueError(f"need T > 0 and weights >= 0; got T={T}, ce={ce_weight}, kl={kl_weight}, cos={cos_weight}")
    denom = ce_weight + len(teacher_logits) * (kl_weight + cos_weight)
    if denom <= 0:
        raise ValueError("all loss weights are zero")
    w = torch.ones(B, dtype=student_logits.dtype, device=student_logits.device) if sample_weight is None \
        else sample_weight.to(student_logits)
    if w.shape != (B,):
        raise ValueError(f"sample_weight must be [{B}], got {tuple(w.shape)}")

    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")          # [B]
    total = ce_weight * ce
    parts = {"ce": float(ce.detach().mean())}
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)                       # [B, 3]
    for k, t in enumerate(teacher_logits):
        log_pt = F.log_softmax(t.detach().float() / T, dim=-1)                       # [B, 3]
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * T * T                      # [B]
        cos = 1 - F.cosine_similarity(log_ps.exp(), log_pt.exp(), dim=-1)            # [B]
        total = total + kl_weight * kl + cos_weight * cos
        parts[f"kl_{k}"], parts[f"cos_{k}"] = float(kl.detach().mean()), float(cos.detach().mean())
    loss = (w.float() * total).mean() / denom
    parts["loss"] = float(loss.detach())
    return loss, parts


def prior_probs(labels, smoothing: float = 1.0) -> np.ndarray:
    """Class frequencies [3] of labels [N] (0/1/2), add-`smoothing` so none is zero."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=3)[:3].astype(np.float64)
    return (counts + smoothing) / (counts.sum() + 3 * smoothing)


def info_gain_weights(teacher_logits, labels, baseline_probs, tau: float = 1.0) -> np.ndarray:
    """Sample weights [N] from teacher_logits [N, 3], labels [N] and baseline_probs [N, 3] or [3].
    r_i = log p_teacher(y_i) - log p_baseline(y_i) (probabilities clipped at 1e-15), then
    w_i = N * softmax(r / tau)_i: every weight > 0, strictly increasing in r_i, mean exactly 1.
    (exp(r) = p_teacher / p_baseline, so with tau = 1 a row weighs its likelihood ratio, relative
    to the others.) Raises ValueError on shapes, labels outside 0..2, or tau <= 0."""
    log_pt, y = _teacher_log_likelihood(teacher_logits, labels)
    n = len(y)
    base = np.asarray(baseline_probs, dtype=np.float64)
    if base.shape == (3,):
        base = np.broadcast_to(base, (n, 3))
    if base.shape != (n, 3) or tau <= 0:
        raise ValueError(f"baseline_probs must be [N, 3] or [3] and tau > 0; got {base.shape}, tau={tau}")
    return _mean_one(log_pt - np.log(np.clip(base[np.arange(n), y], 1e-15, 1)), tau)


def _teacher_log_likelihood(teacher_logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """log p_teacher(y_i) [N] (clipped at 1e-15) and the labels [N] as int64; validates shapes."""
    z = np.asarray(teacher_logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if z.shape != (n, 3) or n == 0 or not np.all(np.isin(y, (0, 1, 2))):
        raise ValueError(f"teacher_logits must be [N, 3] and labels [N] in 0..2; got {z.shape}, {y.shape}")
    return np.log(np.clip(softmax(z)[np.arange(n), y], 1e-15, 1)), y


def _mean_one(r: np.ndarray, tau: float) -> np.ndarray:
    """N * softmax(r / tau): positive, increasing in r, mean exactly 1."""
    e = np.exp((r - r.max()) / tau)          # max-shifted: no overflow; r is bounded so no underflow to 0
    return len(r) * e / e.sum()


class EmaBaseline:
    """Per-row baseline probabilities [N, 3] for info_gain_weights: an EMA of the student's own
    predictions (a cheap stand-in for RLP's EMA-of-parameters model), starting at a prior.
    Each visit of row i does p_i <- decay * p_i + (1 - decay) * p_student_i.
    Note: a row is visited only epochs x (1 + swap) times, so with decay 0.999 the baseline stays
    close to its prior; lower decay (e.g. 0.5) makes it track the student."""

    def __init__(self, n_rows: int, prior, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (3,):
            raise ValueError(f"prior must be [3], got {prior.shape}")
        self.decay = decay
        self.probs = np.tile(prior / prior.sum(), (n_rows, 1))   # [N, 3]

    def __call__(self, idx) -> np.ndarray:
        """Baseline probabilities [B, 3] of rows idx [B]."""
        return self.probs[np.asarray(idx)]

    def update(self, idx, student_probs) -> None:
        """Fold the student's probabilities [B, 3] on rows idx [B] (distinct) into the baseline."""
        idx = np.asarray(idx)
        p = np.asarray(student_probs, dtype=np.float64)
        self.probs[idx] = self.decay * self.probs[idx] + (1 - self.decay) * p

    def state_dict(self) -> dict:
        return {"decay": self.decay, "probs": self.probs.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.probs = float(state["decay"]), np.asarray(state["probs"], dtype=np.float64).copy()


class EmaInfoGainWeights:
    """Information-gain weights against an EMA of the student (distill.info_gain_baseline: ema),
    recomputed as training goes. It is a dynamic sample_weight for lmsys.train.train_classifier:
      batch(idx)          weights [b] of rows idx: info_gain_weights(teacher, labels, ema, tau)[idx],
                          i.e. mean 1 over all N rows against the baseline as it is now
      observe(idx, p)     fold the student's probabilities p [b, 3] on rows idx into the EMA
      state_dict() / load_state_dict(s)   the EMA, saved in training checkpoints (exact resume)
      fingerprint()       identity of teacher, labels, prior, decay and tau (checkpoint validity)
    A row the student already explains as well as the teacher loses weight; one it still gets
    wrong while the teacher gets it right gains weight."""

    def __init__(self, teacher_logits, labels, prior, decay: float = 0.5, tau: float = 1.0):
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.log_pt, self.labels = _teacher_log_likelihood(teacher_logits, labels)   # [N], [N]
        self.tau = float(tau)
        self.ema = EmaBaseline(len(self.labels), prior, decay)
        self._id = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in (
            self.log_pt, self.labels, self.ema.probs[0], np.array([decay, tau])))).hexdigest()

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> np.ndarray:
        rows = np.arange(len(self.labels))
        r = self.log_pt - np.log(np.clip(self.ema.probs[rows, self.labels], 1e-15, 1))   # [N]
        return _mean_one(r, self.tau)[np.asarray(idx)]

    def observe(self, idx, student_probs) -> None:
        self.ema.update(idx, student_probs)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)

    def fingerprint(self) -> str:
        return self._id
