"""The short-term model: a small GPT-2-style causal transformer over item-id sequences.

Written out in the nanoGPT manner (pre-LayerNorm blocks, learned positions, GELU MLP, tied
item embeddings) rather than through transformers' GPT2Model: the same architecture, but a
graph that exports to ONNX with left padding and dynamic shapes without surprises.

Rows are item rows (0 = padding). Sequences are left-padded, so the newest item is always
at position T-1 and h_s = hidden[:, -1]. Positions count real items only (cumsum of the
mask), so a user's sequence gets the same positions whatever the batch's padding.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NEG = -1e9  # a finite "minus infinity": fully-masked rows stay NaN-free in torch and ONNX


@dataclass
class GPTConfig:
    n_rows: int  # item rows including padding row 0
    max_len: int = 20  # ml-100k, 3 seeds: NDCG@10 0.0890 at 50, 0.0971 at 20; 10 was worse
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False
                ) -> torch.Tensor:
        """x (B, T, C) -> (B, Tq, C): Tq = T, or 1 (the newest position's output) if last_only."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        if last_only:  # every position is still a key and a value; only the newest asks
            q, allowed = q[:, -1:], allowed[:, :, -1:]
        Tq = q.size(1)
        q = q.view(B, Tq, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, Tq, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, H, Tq, T)
        att = att.masked_fill(~allowed, NEG)
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False
                ) -> torch.Tensor:
        residual = x[:, -1:] if last_only else x  # (B, Tq, C)
        x = residual + self.attn(self.ln_1(x), allowed, last_only)
        return x + self.mlp(self.ln_2(x))


class ItemGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.n_rows, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def item_embeddings(self) -> torch.Tensor:
        return self.tok_emb.weight  # (n_rows, C), tied with the output layer

    def forward(self, rows: torch.Tensor, mask: torch.Tensor, last_only: bool = False
                ) -> torch.Tensor:
        """rows (B, T) int64 left-padded, mask (B, T) float -> hidden states (B, T, C).

        last_only: only the newest position's state, (B, 1, C). The last block then runs its
        attention output, projection and MLP for that position alone (the served graph)."""
        B, T = rows.shape
        real = mask > 0.5  # (B, T)
        pos = (torch.cumsum(mask, dim=1) - 1.0).clamp(min=0.0).long()  # (B, T)
        pos = pos.clamp(max=self.cfg.max_len - 1)
        x = self.drop(self.tok_emb(rows) + self.pos_emb(pos))  # (B, T, C)
        causal = torch.ones(T, T, dtype=torch.bool, device=rows.device).tril()  # (T, T)
        allowed = causal[None, None, :, :] & real[:, None, None, :]  # (B, 1, T, T)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only and i == len(self.blocks) - 1)
        return self.ln_f(x)  # (B, T, C), or (B, 1, C) if last_only

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.item_embeddings.T  # (..., n_rows)


class ShortTermHead(nn.Module):
    """The exported graph: (rows, mask) -> h_s, the hidden state at the newest position."""

    def __init__(self, gpt: ItemGPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, item_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gpt(item_rows, mask, last_only=True)[:, -1, :]  # (B, C)
