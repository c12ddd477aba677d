"""Online (prequential) evaluation over the `recommendations` stream.

For each user's next event, was its item in the top-K published after the previous one?
Each recommendation carries the event's `item_id`, so the output topic alone is enough.
"""
from __future__ import annotations

from collections import deque

from streams.quality import difference_ci, hit_rate, mean_ci, ndcg


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


def arm_report(scored: list[tuple[str, str, int]], k: int = 10,
               control: str | None = None) -> dict:
    """Per arm, online HR@k and NDCG@k with 95 % intervals over users, from (arm, user, rank)
    triples; and each other arm against `control` (default: the first arm seen): the
    difference, its interval, and whether it excludes 0. Users are the unit (one user's events
    are not independent): each user contributes the mean over their scored events."""
    per_user: dict[str, dict[str, list[int]]] = {}
    for arm, user, rank in scored:
        per_user.setdefault(arm, {}).setdefault(user, []).append(rank)
    if not per_user:
        return {}
    control = control if control in per_user else next(iter(per_user))
    values = {arm: {"hr": [hit_rate(r, k) for r in users.values()],
                    "ndcg": [ndcg(r, k) for r in users.values()]}
              for arm, users in per_user.items()}
    out = {}
    for arm, users in per_user.items():
        row = {"users": len(users), "events": sum(map(len, users.values()))}
        for metric in ("hr", "ndcg"):
            mean, low, high = mean_ci(values[arm][metric])
            row[f"{metric}@{k}"] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
            if arm != control:
                diff, low, high = difference_ci(values[control][metric], values[arm][metric])
                row[f"{metric}@{k}"]["vs_" + control] = {
                    "difference": round(diff, 4), "ci95": [round(low, 4), round(high, 4)],
                    "significant": bool(low > 0 or high < 0)}
        out[arm] = row
    return out
