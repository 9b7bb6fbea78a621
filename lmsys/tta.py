"""Test-time augmentation by A/B swap (recipe steps 8/8.5).

The model scores every battle twice: as given, and with responses A and B exchanged. The
swapped run's probabilities say "A" where they mean the original "B", so their A and B
columns are exchanged back and the two runs averaged.

Symmetry (exact, in floating point): let S be the column swap and f the model. Then
    symmetrize(f(x), f(swap(x))) = (f(x) + S f(swap(x))) / 2.
Scoring the swapped test set instead gives (f(swap(x)) + S f(x)) / 2 = S of the above (S is its
own inverse, and IEEE addition commutes), i.e. A and B exchanged and the tie column identical.
So the output no longer depends on which response the data happened to list first.
"""
from __future__ import annotations

import numpy as np

SWAP = [1, 0, 2]   # column permutation: A <-> B, tie stays


def swap_probs(p) -> np.ndarray:
    """[N, 3] -> [N, 3] with columns A and B exchanged (works for probabilities or logits).
    Raises ValueError unless the last axis has 3 columns."""
    p = np.asarray(p)
    if p.shape[-1] != 3:
        raise ValueError(f"expected 3 columns (A, B, tie), got shape {p.shape}")
    return p[..., SWAP]


def symmetrize(p_orig, p_swapped_input) -> np.ndarray:
    """Mean of the model's probabilities on the original input [N, 3] and its probabilities on the
    A/B-swapped input [N, 3] with columns swapped back. Rows still sum to 1 when the inputs do.
    Raises ValueError on shape mismatch."""
    a = np.asarray(p_orig, dtype=np.float64)
    b = np.asarray(p_swapped_input, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return (a + swap_probs(b)) / 2
