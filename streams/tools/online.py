"""Online (prequential) evaluation over the `recommendations` stream.

For each user's next event, was its item in the top-K published after the previous one?
Each recommendation carries the event's `item_id`, so the output topic alone is enough.
"""
from __future__ import annotations

from collections import deque

from streams.quality import hit_rate, ndcg


class PrequentialEvaluator:
    def __init__(self, k: int = 10, window: int = 1000, max_users: int = 200_000):
        self.k, self.max_users = k, max_users
        self.previous: dict[str, list[str]] = {}
        self.ranks: list[int] = []
        self.recent: deque[int] = deque(maxlen=window)
        self.seen_event_ids: set[str] = set()

    def update(self, rec: dict) -> int | None:
        """Score `rec`'s event against the user's previous list; returns its rank (k+1 = miss)."""
        if rec["event_id"] in self.seen_event_ids:  # a duplicate under at-least-once
            return None
        self.seen_event_ids.add(rec["event_id"])
        user, rank = rec["user_id"], None
        previous = self.previous.get(user)
        if previous is not None and rec.get("item_id") is not None:
            top = previous[: self.k]
            rank = top.index(rec["item_id"]) + 1 if rec["item_id"] in top else self.k + 1
            self.ranks.append(rank)
            self.recent.append(rank)
        if len(self.previous) < self.max_users or user in self.previous:
            self.previous[user] = [i["item_id"] for i in rec["items"]]
        return rank

    def summary(self) -> dict:
        return {f"hr@{self.k}": hit_rate(self.ranks, self.k), f"ndcg@{self.k}": ndcg(self.ranks, self.k),
                f"recent_hr@{self.k}": hit_rate(list(self.recent), self.k), "n": len(self.ranks)}
