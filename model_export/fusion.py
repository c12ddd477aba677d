"""Interest fusion: the short-term h_s and the long-term h_l become one vector, then top-K.

Three modes, picked at serve time by a one-hot `mode` input of the exported graph:

- fixed:     fused = a*h_s + (1-a)*h_l, a a setting (the article's second form);
- attention: w = exp(h_s.h_l) / (exp(h_s.h_l) + sum_i exp(h_s.e_i)) over the projected BERT
             vectors e_i of the user's recent items (the article's first form, with h_l in
             its own denominator so that w is a softmax weight in [0, 1]); dot products are
             scaled by 1/sqrt(D) as in attention;
- gate:      a = sigmoid(MLP([h_s, h_l, h_s*h_l, log1p(dt)])), learned (SLi-Rec / CLSR).

No long-term vector (has_long = 0) -> a = 1: short-term only.

Then the item-item model's scores over the user's recent window (`model_export.item_item`,
recency-weighted by its half-life, a constant of the graph) are added with weight
`item_item_weight` (chosen on validation; 0 switches them off), whatever the
mode: they need no long-term vector, only the items the worker's state holds.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from streams.bundle import MASKED_SCORE

from . import item_item

NEG = MASKED_SCORE  # also what the worker reads as "masked" in top_scores


class LongTermProjection(nn.Module):
    """BERT space (E) -> GPT item space (D)."""

    def __init__(self, d_text: int, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_text, d_model)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb)


class InterestGate(nn.Module):
    def __init__(self, d_model: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * d_model + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, h_s: torch.Tensor, h_l: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(torch.cat([h_s, h_l, h_s * h_l, dt], dim=-1)))  # (B, 1)


def attention_weight(
    h_s: torch.Tensor, h_l: torch.Tensor, hist_e: torch.Tensor, hist_mask: torch.Tensor
) -> torch.Tensor:
    """The article's softmax weight of h_s: (B, D), (B, D), (B, N, D), (B, N) -> (B, 1)."""
    scale = 1.0 / math.sqrt(h_s.size(-1))
    s_l = (h_s * h_l).sum(-1, keepdim=True) * scale  # (B, 1)
    s_i = (h_s[:, None, :] * hist_e).sum(-1) * scale  # (B, N)
    s_i = torch.where(hist_mask > 0.5, s_i, torch.full_like(s_i, NEG))
    return torch.sigmoid(s_l - torch.logsumexp(s_i, dim=-1, keepdim=True))  # (B, 1)


class FusionHead(nn.Module):
    """The exported graph: fused vector, alpha and the top-K unseen items."""

    def __init__(self, item_emb: torch.Tensor, gate: InterestGate, max_k: int,
                 neighbour_rows: torch.Tensor, neighbour_weights: torch.Tensor,
                 neighbour_decay: float = 1.0):
        super().__init__()
        self.register_buffer("item_emb", item_emb.detach().clone())  # (n_rows, D)
        self.register_buffer("neighbour_rows", neighbour_rows.clone())  # (n_rows, K) int64
        self.register_buffer("neighbour_weights", neighbour_weights.clone())  # (n_rows, K)
        self.register_buffer("neighbour_decay", torch.tensor(float(neighbour_decay)))  # per age
        self.gate = gate
        self.max_k = max_k

    def alpha(self, h_s, h_l, has_long, hist_e, hist_mask, dt, mode, fixed_alpha):
        a_fixed = fixed_alpha.reshape(1, 1).expand(h_s.size(0), 1)  # (B, 1)
        a_att = attention_weight(h_s, h_l, hist_e, hist_mask)  # (B, 1)
        a_gate = self.gate(h_s, h_l, dt)  # (B, 1)
        a = torch.cat([a_fixed, a_att, a_gate], dim=-1) @ mode.reshape(3, 1)  # (B, 1)
        return has_long * a + (1.0 - has_long)  # no long-term vector: short-term only

    def forward(self, h_s, h_l, has_long, hist_e, hist_rows, hist_mask, dt, seen_mask, mode,
                fixed_alpha, item_item_weight, k):
        alpha = self.alpha(h_s, h_l, has_long, hist_e, hist_mask, dt, mode, fixed_alpha)
        fused = alpha * h_s + (1.0 - alpha) * h_l  # (B, D)
        item_scores = item_item_weight * item_item.scores(
            self.neighbour_rows, self.neighbour_weights, hist_rows, hist_mask,
            self.item_emb.size(0), self.neighbour_decay)  # (B, n_rows)
        scores = fused @ self.item_emb.T + item_scores  # (B, n_rows)
        scores = torch.where(seen_mask > 0.5, torch.full_like(scores, NEG), scores)
        # k is an input, not max_k: onnxruntime's TopK costs ~14x more at 100 than at 10.
        top_scores, top_rows = torch.topk(scores, k.reshape(()), dim=-1)  # (B, k)
        top_item_item = item_scores.gather(1, top_rows)  # (B, k) its share of each top score
        return fused, alpha, top_scores, top_rows, top_item_item
