"""The long-term model: an encoder over a user's newest `window` items -> h_l in the GPT's item space.

Each item's input is a learned ID embedding (what users do with it) plus a learned projection
of its frozen MiniLM text embedding (what it is: meaning for rare and new items). With
`n_layer` > 0 the inputs pass through a bidirectional transformer encoder (the BERT
architecture, as BERT4Rec uses it) before pooling; with `n_layer` = 0 they are pooled directly.
Pooling is a weighted mean: weight = 0.5 ** (age / half_life) times the event type's weight.

The zero-layer tower is what the build serves by default when it wins on validation: its
pooled input is a decayed running sum, so the worker adds a user's newest events to the
refreshed sum and only the small head runs per batch (`streams.inference.LongTermUpdater`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import Block, GPTConfig


@dataclass
class LongTermConfig:
    n_rows: int  # item rows including padding row 0
    d_text: int  # MiniLM embedding size
    d_out: int  # the GPT's d_model: h_l is scored against the GPT's item embeddings
    window: int = 200  # newest items read; Redis keeps more (LONG_HISTORY_CAP)
    half_life: float = 1e9  # in items; ~uniform weights by default, chosen on validation
    d_model: int = 64
    n_layer: int = 0  # 0: the pooled tower (incremental); > 0: a BERT over the history
    n_head: int = 2
    dropout: float = 0.2
    use_text: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def incremental(self) -> bool:
        return self.n_layer == 0


class LongTermHead(nn.Module):
    """Pooled input (B, C) -> h_l (B, D): LayerNorm, then an MLP into the GPT's item space."""

    def __init__(self, cfg: LongTermConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(2 * cfg.d_model, cfg.d_out)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(F.gelu(self.fc(self.ln(pooled)))))


class LongTermModel(nn.Module):
    def __init__(self, cfg: LongTermConfig, text_emb: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.id_emb = nn.Embedding(cfg.n_rows, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        with torch.no_grad():
            self.id_emb.weight[0].zero_()
        self.register_buffer("text_emb", text_emb.detach().float().clone())  # (n_rows, E) frozen
        self.text_proj = nn.Linear(cfg.d_text, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)  # on the item inputs
        # the GPT's block; what makes it a BERT is the mask below, every real item for every one
        block_cfg = GPTConfig(n_rows=cfg.n_rows, n_head=cfg.n_head, d_model=cfg.d_model,
                              dropout=cfg.dropout)
        self.blocks = nn.ModuleList([Block(block_cfg) for _ in range(cfg.n_layer)])
        # positions by age (newest = 0) for the BERT; the pooled tower stays order-free, so
        # that its mean can be updated one event at a time
        self.age_emb = nn.Embedding(cfg.window, cfg.d_model) if cfg.n_layer else None
        self.head = LongTermHead(cfg)

    def item_inputs(self) -> torch.Tensor:
        """(n_rows, C): each item's input vector; row 0 (padding) is zero."""
        table = self.id_emb.weight
        if self.cfg.use_text:
            table = table + self.text_proj(self.text_emb)
        return table * (torch.arange(table.size(0), device=table.device) > 0)[:, None]

    def pool(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows (B, T) left-padded, weights (B, T) (0 at padding) -> pooled (B, C)."""
        total = weights.sum(1, keepdim=True).clamp(min=1e-6)  # (B, 1)
        if not self.blocks:  # dropout on the table: 1/T of the work of dropping (B, T, C)
            x = F.embedding(rows, self.drop(self.item_inputs()))  # (B, T, C)
            return (weights[:, None, :] @ x)[:, 0] / total  # (B, C)
        x = F.embedding(rows, self.item_inputs())  # (B, T, C)
        real = (rows > 0).float()
        age = torch.flip(torch.cumsum(torch.flip(real, [1]), 1), [1]) - 1.0  # newest: 0
        x = self.drop(x + self.age_emb(age.clamp(0, self.cfg.window - 1).long()))
        allowed = (rows > 0)[:, None, None, :]  # (B, 1, 1, T): keys are the real items
        for block in self.blocks:
            x = block(x, allowed)
        return (weights[:, None, :] @ x)[:, 0] / total  # (B, C)

    def forward(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(rows, weights))  # (B, D)


def recency_weights(mask: torch.Tensor, half_life: float) -> torch.Tensor:
    """(B, T) left-padded mask -> 0.5 ** (age / half_life) at real items, 0 at padding."""
    age = torch.flip(torch.cumsum(torch.flip(mask, [1]), 1), [1]) - 1.0  # newest: age 0
    return mask * torch.pow(0.5, age.clamp(min=0.0) / half_life)


class LongTermGraph(nn.Module):
    """The exported graph: (item_rows, weights) -> (h_l, pooled). `weights` carry the recency
    and event-type weights, so the refresher and the worker's update share one definition."""

    def __init__(self, model: LongTermModel):
        super().__init__()
        self.model = model

    def forward(self, item_rows: torch.Tensor, weights: torch.Tensor):
        pooled = self.model.pool(item_rows, weights)  # (B, C)
        return self.model.head(pooled), pooled


class LongTermHeadGraph(nn.Module):
    """The exported head alone: pooled (B, C) -> h_l (B, D), for the worker's per-batch update."""

    def __init__(self, model: LongTermModel):
        super().__init__()
        self.head = model.head

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)
