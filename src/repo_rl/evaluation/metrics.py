"""The evaluation metrics: pure functions, no I/O, no torch.

One definition of each number for every caller (``repo-rl eval``, the trainer's eval, the toy
world's greedy accuracy): a sample is correct when :func:`is_correct`; ``pass@k`` is the unbiased
estimator of Chen et al. (2021); ``avg@k`` is the mean correctness of an item's k samples, so
``pass@1 == avg@k`` and, with one greedy sample per item, both are the plain accuracy. See the
Metrics section of ``docs/EVALUATION.md``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

__all__ = ["aggregate", "avg_at_k", "default_ks", "is_correct", "macro_average", "pass_at_k"]

MACRO_KEYS = ("pass@1", "avg@k", "pass@k")
"""The benchmark metrics that :func:`macro_average` averages."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with ``c`` correct out of ``n`` samples (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so it never
    forms large binomials.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def is_correct(score: Optional[float]) -> bool:
    """A sample is correct when its verifier score is >= 0.5 (scores are 0/1); None (error, timeout) is not."""
    return score is not None and not math.isnan(score) and score >= 0.5


def avg_at_k(scores: Sequence[Optional[float]]) -> float:
    """Mean correctness of the k samples of one item (None counts as incorrect)."""
    if len(scores) == 0:
        raise ValueError("avg_at_k: no scores")
    return sum(is_correct(s) for s in scores) / len(scores)


def default_ks(n: int) -> list[int]:
    """1, the powers of two below n, and n."""
    ks = {1, n}
    k = 2
    while k < n:
        ks.add(k)
        k *= 2
    return sorted(ks)


def aggregate(item_scores: Sequence[Sequence[Optional[float]]], ks: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Benchmark metrics from the per-sample scores of each item (every item has the same n).

    ``pass@1`` and ``pass@k`` (k = n) are means over items of :func:`pass_at_k`; ``avg@k`` the
    mean over items of :func:`avg_at_k`. ``pass_at`` holds pass@k for every k in ``ks``.
    """
    if not item_scores:
        raise ValueError("aggregate: no items")
    n = len(item_scores[0])
    if n < 1 or any(len(s) != n for s in item_scores):
        raise ValueError("aggregate: every item needs the same number (>= 1) of scores")
    counts = [sum(is_correct(s) for s in row) for row in item_scores]
    ks = sorted(set(ks)) if ks else default_ks(n)
    m = len(item_scores)
    pass_at = {str(k): sum(pass_at_k(n, c, k) for c in counts) / m for k in ks if 1 <= k <= n}
    return {
        "items": m,
        "n": n,
        "k": n,
        "pass@1": sum(pass_at_k(n, c, 1) for c in counts) / m,
        "avg@k": sum(avg_at_k(row) for row in item_scores) / m,
        "pass@k": sum(pass_at_k(n, c, n) for c in counts) / m,
        "pass_at": pass_at,
        "correct_samples": sum(counts),
        "solved_items": sum(c > 0 for c in counts),
    }


def macro_average(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean over benchmarks (how papers report an "Avg." column)."""
    m = len(results)
    return {key: sum(r[key] for r in results.values()) / m for key in MACRO_KEYS}
