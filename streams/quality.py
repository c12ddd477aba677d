"""Ranking metrics shared by the offline evaluation and the online (prequential) one.

A rank is 1-based: 1 means the held-out item was the top recommendation.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def hit_rate(ranks: Sequence[int], k: int = 10) -> float:
    """Share of cases whose item ranked in the top k."""
    return sum(1 for r in ranks if r <= k) / len(ranks) if ranks else 0.0


def ndcg(ranks: Sequence[int], k: int = 10) -> float:
    """Mean NDCG@k with one relevant item per case: 1/log2(rank+1) inside the top k."""
    return sum(1.0 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks) if ranks else 0.0


def mrr(ranks: Sequence[int]) -> float:
    """Mean reciprocal rank over the full ranking."""
    return sum(1.0 / r for r in ranks) / len(ranks) if ranks else 0.0


def coverage(recommended: Iterable[Iterable], n_items: int) -> float:
    """Share of the catalog that appears in at least one recommendation list."""
    distinct = set()
    for items in recommended:
        distinct.update(items)
    return len(distinct) / n_items if n_items else 0.0


def rank_of(scores: Sequence[float], target: int, excluded: Iterable[int] = ()) -> int:
    """1-based rank of `target` among candidates (excluded rows removed, ties counted against)."""
    excluded = set(excluded)
    t = scores[target]
    return 1 + sum(1 for i, s in enumerate(scores) if i != target and i not in excluded and s >= t)


def summarize(ranks: Sequence[int], recommended: Iterable[Iterable], n_items: int, k: int = 10) -> dict:
    return {
        f"hr@{k}": hit_rate(ranks, k),
        f"ndcg@{k}": ndcg(ranks, k),
        "mrr": mrr(ranks),
        f"coverage@{k}": coverage(recommended, n_items),
        "n": len(ranks),
    }


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95 % interval: (mean, low, high)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def difference_ci(a: Sequence[float], b: Sequence[float], z: float = 1.96
                  ) -> tuple[float, float, float]:
    """mean(b) - mean(a) and its 95 % interval for independent samples (Welch's normal
    approximation): significant when the interval excludes 0."""
    ma, la, ha = mean_ci(a, z)
    mb, lb, hb = mean_ci(b, z)
    half = math.hypot((ha - la) / 2, (hb - lb) / 2)
    return mb - ma, mb - ma - half, mb - ma + half
