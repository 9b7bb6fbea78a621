"""What a step computes, in tokens: the cost plan's (lmsys.plan) model of the trainer and the inference paths.

A dataset's rows are described by their token lengths under the recipe's template before any cut:
a log-normal through the median and the 90th percentile (`orchestration.estimate.tokens.<dataset>`),
which the recipe's measured Kaggle lengths fit (docs/recipe.md: median 589, p90 1240; mean 683 capped
at 2000). A step cuts rows at its max length (text.train_max_length / infer_max_length), so a row
costs `min(length, cap)` real tokens.

What a training step computes per row depends on how the trainer forms micro-batches:
  padded   random micro-batches of batch_size rows, each padded to its longest row (trainer.packing false):
           computed = real / efficiency, the efficiency simulated on the lengths (0.69 at batch 4 on
           the Kaggle lengths cut at 1024: 624 real tokens a row cost 909);
  packed   each optimizer step's rows (batch_size x grad_accum) laid end to end in packs of at most
           trainer.pack_tokens, first-fit by decreasing length (first_fit, the rule lmsys.train packs
           with), each pack rounded up to flex attention's 128-token block: computed ~ real (0.99).
Attention's share of the FLOPs (a few % at these lengths) is not modelled: cost is linear in tokens.

`evaluation_passes` is how often lmsys.train evaluates: every `eval_every` optimizer steps and once
more at the end when the last step was not an evaluation step; one pass when eval_every is null.

Simulations are seeded (SEED) and cached: the plan is the same on every run. No torch import.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

SEED = 2025
SAMPLES = 100_000        # simulated rows per length distribution
FLEX_BLOCK = 128         # a pack's length is a multiple of flex attention's block (lmsys/infer_packed.py)
Z90 = 1.2815515655446004  # the standard normal's 90th percentile


# ---------------------------------------------------------------- lengths

def lognormal(median: float, p90: float) -> tuple[float, float]:
    """(mu, sigma) of the log-normal with this median and 90th percentile. Raises ValueError unless
    0 < median < p90."""
    if not 0 < median < p90:
        raise ValueError(f"token statistics need 0 < median < p90, got median {median}, p90 {p90}")
    return math.log(median), math.log(p90 / median) / Z90


@lru_cache(maxsize=64)
def lengths(median: float, p90: float, cap: int, n: int = SAMPLES, seed: int = SEED) -> np.ndarray:
    """n seeded token lengths (int, >= 1) drawn from the log-normal, cut at `cap` (read-only array)."""
    mu, sigma = lognormal(median, p90)
    out = np.clip(np.rint(np.exp(np.random.default_rng(seed).normal(mu, sigma, n))), 1, cap).astype(np.int64)
    out.flags.writeable = False
    return out


Mixture = tuple[tuple[float, float, float], ...]    # ((median, p90, rows), ...): one entry per dataset


@lru_cache(maxsize=256)
def mixture(stats: Mixture, cap: int, n: int = SAMPLES) -> np.ndarray:
    """Lengths of rows drawn from several datasets in proportion to their rows, in a seeded random
    order (a training set mixes its datasets' rows; read-only array)."""
    total = sum(rows for _, _, rows in stats)
    parts = [lengths(m, p, cap)[: max(1, round(n * rows / total))] for m, p, rows in stats if rows > 0]
    out = np.random.default_rng(SEED).permutation(np.concatenate(parts))
    out.flags.writeable = False
    return out


def mean_tokens(stats: Mixture, cap: int) -> float:
    """Mean real tokens of a row of the mixture cut at `cap`."""
    return float(mixture(stats, cap).mean())


# ---------------------------------------------------------------- computed per real token

def padded_efficiency(rows: np.ndarray, batch_size: int) -> float:
    """Real / computed tokens of random micro-batches of `batch_size` rows padded to their longest."""
    n = len(rows) // batch_size * batch_size
    batches = rows[:n].reshape(-1, batch_size)
    return float(batches.sum() / (batches.max(axis=1).sum() * batch_size))


def first_fit(lengths, pack_tokens: int) -> list[list[int]]:
    """Positions in `lengths` of the rows of each pack: first-fit by decreasing length (equal lengths
    in input order) into packs of at most pack_tokens tokens. The one packing rule: lmsys.train packs
    each optimizer step's rows with it, and pack_lengths prices it. Raises ValueError when a row is
    longer than a pack."""
    lengths = [int(x) for x in lengths]
    if lengths and max(lengths) > pack_tokens:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit trainer.pack_tokens={pack_tokens}")
    used: list[int] = []
    packs: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):      # sorted() is stable
        for p, u in enumerate(used):
            if u + lengths[i] <= pack_tokens:
                used[p] += lengths[i]
                packs[p].append(i)
                break
        else:
            used.append(lengths[i])
            packs.append([i])
    return packs


def pack_lengths(rows: np.ndarray, pack_tokens: int, block: int = FLEX_BLOCK) -> list[int]:
    """Computed length of each pack when `rows` (one optimizer step's) are packed by first_fit, each
    pack rounded up to `block`. Raises ValueError when a row is longer than a pack."""
    return [-(-sum(int(rows[i]) for i in pack) // block) * block for pack in first_fit(rows, pack_tokens)]


def packed_efficiency(rows: np.ndarray, rows_per_step: int, pack_tokens: int, steps: int = 500) -> float:
    """Real / computed tokens when each optimizer step's rows are packed (pack_lengths), over the
    first `steps` steps of `rows`."""
    real = computed = 0
    for start in range(0, min(len(rows), steps * rows_per_step), rows_per_step):
        step = rows[start:start + rows_per_step]
        real += int(step.sum())
        computed += sum(pack_lengths(step, pack_tokens))
    return real / computed


def training_tokens(stats: Mixture, cap: int, section: dict) -> dict:
    """Real and computed tokens per training row of the mixture cut at `cap`, under a trainer
    section (batch_size, grad_accum, packing, pack_tokens): {"real", "computed", "efficiency", "mode"}."""
    packing = bool(section.get("packing"))
    eff = _efficiency(stats, cap, packing, int(section["batch_size"]), int(section.get("grad_accum", 1)),
                      int(section.get("pack_tokens") or 0))
    mode = (f"packed, {int(section['pack_tokens'])}-token packs" if packing
            else f"padded micro-batches of {int(section['batch_size'])}")
    real = mean_tokens(stats, cap)
    return {"real": real, "computed": real / eff, "efficiency": eff, "mode": mode}


@lru_cache(maxsize=64)
def _efficiency(stats: Mixture, cap: int, packing: bool, batch_size: int, grad_accum: int, pack_tokens: int) -> float:
    rows = mixture(stats, cap)
    return packed_efficiency(rows, batch_size * grad_accum, pack_tokens) if packing else padded_efficiency(rows, batch_size)


# ---------------------------------------------------------------- what lmsys.train does

def optimizer_steps(n_rows: int, section: dict) -> int:
    """Optimizer steps lmsys.train takes on n_rows training rows: ceil(ceil(n / batch_size) / grad_accum)
    a epoch, times epochs, unless max_steps is set."""
    per_epoch = math.ceil(math.ceil(n_rows / int(section["batch_size"])) / int(section.get("grad_accum", 1)))
    return int(section["max_steps"]) if section.get("max_steps") else int(section.get("epochs", 1)) * per_epoch


def evaluation_passes(n_rows: int, section: dict) -> int:
    """Passes over the validation rows lmsys.train makes on n_rows training rows: one every
    eval_every optimizer steps, plus one at the end unless the last step was an evaluation step
    (eval_every null or 0: only the one at the end)."""
    steps, every = optimizer_steps(n_rows, section), section.get("eval_every")
    if not every:
        return 1
    return steps // int(every) + (0 if steps % int(every) == 0 else 1)
