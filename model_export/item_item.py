"""The item-item model: which items follow from the ones a user chose, by collaborative
regression (EASE: Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

B minimises ||X - XB||^2 + l2 ||B||^2 with diag(B) = 0 over the binary user x item matrix X
of the training histories; closed form B = I - P / diag(P), P = (X^T X + l2 I)^-1. Each item
keeps its `neighbours` strongest successors (a sparse table the fusion graph gathers), and a
user's score for item i is the sum of B[j, i] over the items j in the user's recent window
(the items the worker's state holds), each weighted 0.5 ** (age / half_life), age 0 for
the newest: order-free, full rank, and computed per batch, so
never stale.

Only the `max_items` most chosen items get a row (the inverse is n^2 memory and n^3 time);
the others keep no neighbours and score only through the GPT.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from streams.inference import pad_left

from .train_long_term import ndcg_gains, seen_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemItemConfig:
    l2_scales: tuple[float, ...] = (0.25, 1.0, 4.0, 16.0)  # l2 = scale x mean diagonal of X^T X
    # the weight of the item-item scores beside the GPT's logits (0: off)
    weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 50.0)
    half_lives: tuple[float, ...] = (1e9, 50.0, 15.0)  # of the window's items, in items
    neighbours: int = 50
    max_items: int = 20_000

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ItemItemTable:
    """Each row's strongest successors: rows (n_rows, K) int64 and their weights (n_rows, K)."""

    rows: np.ndarray
    weights: np.ndarray
    l2: float


def fit(seqs: list[list[int]], n_rows: int, l2_scale: float, cfg: ItemItemConfig
        ) -> ItemItemTable:
    """EASE over the histories `seqs` (rows >= 1), sparsified to `cfg.neighbours` per row."""
    counts = np.bincount([r for s in seqs for r in set(s)], minlength=n_rows)
    counts[0] = 0
    chosen = np.flatnonzero(counts)
    # the rows that get neighbours: the most chosen ones
    kept = np.sort(chosen[np.argsort(-counts[chosen], kind="stable")][:cfg.max_items])
    index = np.full(n_rows, -1, dtype=np.int64)
    index[kept] = np.arange(len(kept))
    gram = cooccurrence([index[np.unique(np.asarray(s, dtype=np.int64))] for s in seqs],
                        len(kept))
    l2 = float(l2_scale * np.mean(np.diag(gram)))
    gram[np.diag_indices_from(gram)] += l2
    # float32 through a Cholesky factor (X^T X + l2 I is positive definite): numpy's inv
    # works in float64 beside an identity, ~3x the memory
    factor = torch.linalg.cholesky(torch.from_numpy(gram))
    del gram
    b = torch.cholesky_inverse(factor).numpy()  # P; then B in place: B[j, i] = -P[j, i] / P[i, i]
    del factor
    b /= -np.diag(b).copy()[None, :]
    np.fill_diagonal(b, 0.0)
    k = min(cfg.neighbours, len(kept))
    table_rows = np.zeros((n_rows, k), dtype=np.int64)
    table_w = np.zeros((n_rows, k), dtype=np.float32)
    for start in range(0, len(kept), 2048):  # the strongest k per row, a block at a time
        block = b[start:start + 2048]
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        table_rows[kept[start:start + 2048]] = kept[top]
        table_w[kept[start:start + 2048]] = np.take_along_axis(block, top, axis=1)
    return ItemItemTable(table_rows, table_w, l2)


def cooccurrence(columns: list[np.ndarray], n: int, max_pairs: int = 1 << 24) -> np.ndarray:
    """X^T X (n, n) float32 of binary rows given by their columns (-1: not kept), by adding
    each row's column pairs: time and memory follow the interactions, not users x items."""
    gram = torch.zeros(n * n, dtype=torch.float32)
    batch, pairs = [], 0

    def add(batch):
        flat = torch.from_numpy(np.concatenate(batch))
        gram.index_put_((flat,), torch.ones(len(flat)), accumulate=True)

    for cols in columns:
        cols = cols[cols >= 0]
        batch.append((cols[:, None] * n + cols[None, :]).ravel())
        pairs += len(cols) ** 2
        if pairs >= max_pairs:
            add(batch)
            batch, pairs = [], 0
    if batch:
        add(batch)
    return gram.view(n, n).numpy()


def decay_of(half_life: float) -> float:
    """The factor per item of age."""
    return 0.5 ** (1.0 / half_life)


def scores(table_rows: torch.Tensor, table_w: torch.Tensor, hist_rows: torch.Tensor,
           hist_mask: torch.Tensor, n_rows: int, decay: torch.Tensor) -> torch.Tensor:
    """(B, n_rows) item-item scores of the users' windows: (n_rows, K), (n_rows, K),
    (B, N) rows left-padded (newest last), (B, N) 1.0 for real entries, () the factor per
    item of age. What the fusion graph computes."""
    b, n = hist_rows.shape
    age = torch.arange(n - 1, -1, -1, dtype=torch.float32)  # (N,) 0 for the newest
    recency = hist_mask * decay ** age  # (B, N)
    to = table_rows[hist_rows].reshape(b, -1)  # (B, N*K)
    w = (table_w[hist_rows] * recency.unsqueeze(-1)).reshape(b, -1)  # (B, N*K)
    return torch.zeros(b, n_rows, dtype=w.dtype).scatter_add(1, to, w)


@dataclass
class ItemItemChoice:
    table: ItemItemTable
    l2_scale: float
    half_life: float
    weight: float  # the item-item share of the fused scores
    fixed_alpha: float  # the fixed mode's short-term weight chosen with it
    valid: dict  # validation NDCG@10 per (l2 scale, half-life) at its best (weight, alpha)


@torch.no_grad()
def choose(seqs: list[list[int]], n_rows: int, window: int, h_s: torch.Tensor,
           h_l: torch.Tensor, item_emb: torch.Tensor, val_seqs: list[np.ndarray],
           targets: torch.Tensor, seen: list[np.ndarray], cfg: ItemItemConfig,
           max_users: int = 10_000, seed: int = 0) -> ItemItemChoice:
    """The l2 scale, half-life, item-item weight and the fixed mode's alpha with the best fused
    validation NDCG@10 (alpha * h_s.e + (1 - alpha) * h_l.e + weight * item-item), over a
    seeded sample of `max_users` validation users beyond that many. Weight 0 is a candidate:
    where the item-item model does not help, it is switched off."""
    users = np.arange(len(val_seqs))
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    alphas = [i / 20 for i in range(21)]
    best, report = None, {}
    for scale in cfg.l2_scales:
        table = fit(seqs, n_rows, scale, cfg)
        for half_life in cfg.half_lives:
            gains = _fused_gains(table, half_life, n_rows, window, h_s, h_l, item_emb, val_seqs,
                                 targets, seen, users, cfg.weights, alphas)
            wi, ai = divmod(int(torch.argmax(gains)), len(alphas))
            hl = "inf" if half_life >= 1e8 else f"{half_life:g}"
            report[f"l2_scale={scale:g},half_life={hl}"] = {
                "fused": round(float(gains[wi, ai]), 4), "weight": cfg.weights[wi],
                "alpha": alphas[ai], "without": round(float(gains[0].max()), 4)}
            log.info("item-item l2 scale %g, half-life %s: fused %.4f at weight %g, alpha %.2f "
                     "(without %.4f)", scale, hl, gains[wi, ai], cfg.weights[wi], alphas[ai],
                     gains[0].max())
            if best is None or gains[wi, ai] > best[0]:
                best = (float(gains[wi, ai]), table, scale, half_life, cfg.weights[wi], alphas[ai])
    _, table, scale, half_life, weight, alpha = best
    return ItemItemChoice(table, scale, half_life, weight, alpha, report)


def _fused_gains(table: ItemItemTable, half_life: float, n_rows: int, window: int, h_s, h_l,
                 item_emb, val_seqs, targets, seen, users: np.ndarray, weights, alphas
                 ) -> torch.Tensor:
    """(weights, alphas) mean validation NDCG@10 of the fused scores over `users`."""
    t_rows, t_w = torch.from_numpy(table.rows), torch.from_numpy(table.weights)
    decay = torch.tensor(decay_of(half_life))
    gains = torch.zeros(len(weights), len(alphas))
    for start in range(0, len(users), 1024):
        at = users[start:start + 1024]
        s_s, s_l = h_s[at] @ item_emb.T, h_l[at] @ item_emb.T
        rows, mask = (torch.from_numpy(a) for a in pad_left([val_seqs[i] for i in at], window))
        s_ii = scores(t_rows, t_w, rows, mask, n_rows, decay)
        at_seen = seen_mask([seen[i] for i in at], n_rows)
        for wi, weight in enumerate(weights):
            for ai, alpha in enumerate(alphas):
                fused = alpha * s_s + (1 - alpha) * s_l + weight * s_ii
                gains[wi, ai] += ndcg_gains(fused, targets[at], at_seen).sum()
    return gains / len(users)
