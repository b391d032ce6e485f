"""Ranking quality of scores against true response lengths.

* Kendall τ-b and Spearman ρ over all items (scipy; ties handled).
* Pairwise accuracy over the δ-filtered pairs (``|La - Lb| / max(La, Lb) >= δ``),
  the pairs PARS trains on: the fraction ordered correctly (longer response =
  higher score); a tied score counts as half right, like a coin flip.
* :func:`bootstrap_se`: the standard error of τ (or any metric) over a resample
  of the evaluation prompts, so two rankers can be told apart from noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# Rows per block in the O(n^2) pair count: bounds memory at ~block * n booleans.
_PAIR_BLOCK = 1024


def _as_arrays(scores: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    length = np.asarray(lengths, dtype=np.float64).ravel()
    if s.shape != length.shape:
        raise ValueError(f"scores ({s.size}) and lengths ({length.size}) differ in size")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return s, length


def kendall_tau(scores: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> float:
    """Kendall τ-b; NaN when fewer than 2 items or either side is constant."""
    from scipy.stats import kendalltau

    s, length = _as_arrays(scores, lengths)
    if s.size < 2 or np.all(s == s[0]) or np.all(length == length[0]):
        return math.nan
    return float(kendalltau(s, length).statistic)


def spearman(scores: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray) -> float:
    """Spearman ρ; NaN when fewer than 2 items or either side is constant."""
    from scipy.stats import spearmanr

    s, length = _as_arrays(scores, lengths)
    if s.size < 2 or np.all(s == s[0]) or np.all(length == length[0]):
        return math.nan
    return float(spearmanr(s, length).statistic)


def pairwise_counts(
    scores: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray, delta: float = 0.2
) -> tuple[float, int]:
    """``(correct, pairs)`` over δ-filtered pairs; a score tie adds 0.5 to ``correct``."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    s, length = _as_arrays(scores, lengths)
    correct = 0.0
    pairs = 0
    n = s.size
    for start in range(0, n, _PAIR_BLOCK):
        ls, ss = length[start : start + _PAIR_BLOCK, None], s[start : start + _PAIR_BLOCK, None]
        # Only j > i, so each unordered pair is counted once.
        upper = np.arange(start, start + ls.shape[0])[:, None] < np.arange(n)[None, :]
        dl = ls - length[None, :]
        keep = upper & (dl != 0) & (np.abs(dl) >= delta * np.maximum(ls, length[None, :]) - 1e-9)
        agree = np.sign(dl) * np.sign(ss - s[None, :])
        pairs += int(keep.sum())
        correct += float((agree[keep] > 0).sum()) + 0.5 * float((agree[keep] == 0).sum())
    return correct, pairs


def pairwise_accuracy(
    scores: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray, delta: float = 0.2
) -> float:
    """Fraction of δ-filtered pairs ordered correctly; NaN when there is no such pair."""
    correct, pairs = pairwise_counts(scores, lengths, delta)
    return correct / pairs if pairs else math.nan


def ranking_metrics(
    scores: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray, delta: float = 0.2
) -> dict[str, float | int]:
    """``kendall_tau``, ``spearman``, ``pairwise_accuracy`` (δ-filtered), ``n``, ``n_pairs``, ``delta``."""
    correct, pairs = pairwise_counts(scores, lengths, delta)
    return {
        "kendall_tau": kendall_tau(scores, lengths),
        "pairwise_accuracy": correct / pairs if pairs else math.nan,
        "spearman": spearman(scores, lengths),
        "n": int(np.asarray(lengths).size),
        "n_pairs": pairs,
        "delta": float(delta),
    }


def bootstrap_se(
    scores: Sequence[float] | np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float] = kendall_tau,
    n_boot: int = 200,
    seed: int = 0,
) -> float:
    """Standard deviation of ``metric`` over ``n_boot`` resamples of the items (with replacement).

    Seeded, so a table re-computed from the same scores shows the same SE.
    """
    s, length = _as_arrays(scores, lengths)
    if s.size < 3:
        return math.nan
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, s.size, s.size)
        v = metric(s[idx], length[idx])
        if not math.isnan(v):
            vals.append(v)
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


__all__ = ["bootstrap_se", "kendall_tau", "pairwise_accuracy", "pairwise_counts", "ranking_metrics", "spearman"]
