"""Each arm's online (prequential) metrics, counted by the worker as it publishes: was the
event's item in the list the user was shown after their previous event? The same definition
as `streams.tools.online` applies to the output topic, so the two agree on one stream."""
from __future__ import annotations

import math
from typing import Sequence

from streams import metrics
from streams.bundle import MASKED_SCORE


class ArmOnlineMetrics:
    """The last list published per user (up to `max_users`, the oldest dropped first)."""

    def __init__(self, k: int, max_users: int = 100_000):
        self.k, self.max_users = k, max_users
        self.last: dict[str, tuple] = {}

    def observe(self, arm: str, pending: Sequence, batch, ids_by_row: Sequence) -> None:
        """Score each new event of `pending` (one arm's) against its user's previous list,
        then remember the list just published for it (`batch`, in `pending`'s order)."""
        scored = hits = 0
        gain = squares = 0.0
        for p, rows, scores in zip(pending, batch.rows.tolist(), batch.scores.tolist()):
            if not p.is_new:  # a redelivery: neither scored nor remembered
                continue
            user = p.event.user_id
            previous = self.last.pop(user, None)
            if previous is not None:
                scored += 1
                if p.event.item_id in previous[:self.k]:
                    hits += 1
                    g = 1.0 / math.log2(previous.index(p.event.item_id) + 2)
                    gain, squares = gain + g, squares + g * g
            self.last[user] = tuple(ids_by_row[r] for r, sc in zip(rows, scores)
                                    if sc > MASKED_SCORE / 2)
            if len(self.last) > self.max_users:
                del self.last[next(iter(self.last))]
        if scored:
            metrics.ONLINE_SCORED.labels(arm).inc(scored)
            metrics.ONLINE_HITS.labels(arm).inc(hits)
            metrics.ONLINE_NDCG.labels(arm).inc(gain)
            metrics.ONLINE_NDCG_SQ.labels(arm).inc(squares)
