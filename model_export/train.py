"""Training: the GPT on next-item prediction, then the text projection and the gate, GPT frozen.

The GPT (and the long-term model, `train_long_term`) train on each user's training sequence
minus its last `held_out_tail` items; the text projection of the article's baselines trains
on every position (a sample of them in a large log), the gate on the held-out ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fusion import InterestGate, LongTermProjection
from .gpt import GPTConfig, ItemGPT

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    fusion_epochs: int = 6
    gate_epochs: int = 20
    held_out_tail: int = 5  # last train items per user kept from the GPT for the gate
    refit: bool = True  # serve models trained again on train + validation with the choices made
    half_life: float = 1000.0  # items; ~uniform over the whole history: measured better in fusion
    projection_examples: int = 200_000  # positions the text baseline's projection learns from
    seed: int = 0
    progress: bool = True


def window_bounds(n: int, max_len: int) -> list[tuple[int, int]]:
    """(start, end) of each GPT window of a sequence of n items, the newest first: seq[start:end]
    holds at most max_len inputs and their targets, shifted by one."""
    return [(max(0, end - max_len - 1), end) for end in range(n, 1, -max_len)]


def windows(sequences: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each row sequence into left-padded (input, target) windows of at most max_len."""
    inputs, targets = [], []
    for seq in sequences:
        for start, end in window_bounds(len(seq), max_len):
            w = seq[start:end]
            x, y = w[:-1], w[1:]
            inputs.append([0] * (max_len - len(x)) + x)
            targets.append([0] * (max_len - len(y)) + y)
    return np.array(inputs, dtype=np.int64), np.array(targets, dtype=np.int64)


def train_gpt(sequences: list[list[int]], gpt_cfg: GPTConfig, cfg: TrainConfig) -> ItemGPT:
    torch.manual_seed(cfg.seed)
    model = ItemGPT(gpt_cfg)
    x_all, y_all = windows(sequences, gpt_cfg.max_len)
    x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(x_all) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, desc="GPT", disable=not cfg.progress, unit="step")
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            hidden = model(x, (x > 0).float())  # (B, T, C)
            loss = F.cross_entropy(model.logits(hidden).reshape(-1, gpt_cfg.n_rows),
                                   y.reshape(-1), ignore_index=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / len(x_all):.3f}")
    bar.close()
    return model.eval()


def pooled_prefixes(seq: list[int], text_emb: np.ndarray, half_life: float) -> np.ndarray:
    """Recency-weighted, normalised mean of the BERT item vectors of every prefix of `seq`.

    Row t pools seq[:t+1] with weight 0.5**(age/half_life): exactly what the refresher does.
    """
    decay = 0.5 ** (1.0 / half_life)
    out = np.zeros((len(seq), text_emb.shape[1]), dtype=np.float32)
    acc = np.zeros(text_emb.shape[1], dtype=np.float32)
    for t, row in enumerate(seq):
        acc = decay * acc + text_emb[row]
        out[t] = acc / max(float(np.linalg.norm(acc)), 1e-8)
    return out


@dataclass
class ProjectionExamples:
    pooled: torch.Tensor  # (M, E) the pooled BERT vector of everything known before the target
    target: torch.Tensor  # (M,)


def window_positions(n: int, max_len: int) -> np.ndarray:
    """The positions t (newest known item; the target is t + 1) of a sequence of n items, in
    the order of its GPT windows (`windows`: the newest window first)."""
    return np.concatenate([np.arange(start, end - 1) for start, end in window_bounds(n, max_len)]
                          or [np.zeros(0, np.int64)])


def projection_examples(sequences: list[list[int]], text_emb: np.ndarray, half_life: float,
                        max_len: int, max_examples: int, seed: int) -> ProjectionExamples:
    """One example per (user, position >= 1), at most `max_examples` of them (a seeded sample
    of positions beyond that: the projection has E x D weights, and the examples' memory
    would grow with the log). Positions come in the order of the GPT's windows."""
    counts = np.array([max(len(seq) - 1, 0) for seq in sequences], dtype=np.int64)
    ends = np.cumsum(counts)
    keep = np.arange(int(ends[-1]) if len(ends) else 0)
    if len(keep) > max_examples:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_examples, replace=False))
    owner = np.searchsorted(ends, keep, side="right")  # the user of each kept example
    nth = keep - (ends - counts)[owner]  # its index among that user's positions
    pooled = np.zeros((len(keep), text_emb.shape[1]), dtype=np.float32)
    target = np.zeros(len(keep), dtype=np.int64)
    bounds = np.flatnonzero(np.diff(owner, prepend=-1, append=len(sequences) + 1))
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # the examples of one user
        seq = sequences[int(owner[lo])]
        t = window_positions(len(seq), max_len)[nth[lo:hi]]
        pooled[lo:hi] = pooled_prefixes(seq, text_emb, half_life)[t]  # freed per user
        target[lo:hi] = np.asarray(seq)[t + 1]
    return ProjectionExamples(torch.from_numpy(pooled), torch.from_numpy(target))


def _batches(n: int, size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, size):
        yield order[start:start + size]


def _fit(module: torch.nn.Module, loss_of, n: int, epochs: int, batch: int, lr: float,
         weight_decay: float, cfg: TrainConfig, desc: str) -> torch.nn.Module:
    """Minimise loss_of(batch indices) over `module`'s parameters; returns it in eval mode."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=epochs, desc=desc, disable=not cfg.progress, unit="epoch")
    for _ in range(epochs):
        for idx in _batches(n, batch, gen):
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return module.eval()


def train_projection(gpt: ItemGPT, ex: ProjectionExamples, d_text: int, cfg: TrainConfig
                     ) -> LongTermProjection:
    """BERT space -> GPT item space, so that h_l alone ranks the next item (all positions)."""
    torch.manual_seed(cfg.seed)
    proj = LongTermProjection(d_text, gpt.cfg.d_model)
    item_emb = gpt.item_embeddings.detach()
    return _fit(proj, lambda idx: F.cross_entropy(proj(ex.pooled[idx]) @ item_emb.T, ex.target[idx]),
                len(ex.target), cfg.fusion_epochs, 512, 3e-3, cfg.weight_decay, cfg, "projection")


def train_gate(item_emb: torch.Tensor, h_s: torch.Tensor, h_l: torch.Tensor, dt: torch.Tensor,
               target: torch.Tensor, cfg: TrainConfig) -> InterestGate:
    """The gate, on positions neither tower trained on (in-sample h_s would teach it to trust
    h_s blindly)."""
    torch.manual_seed(cfg.seed)
    gate = InterestGate(h_s.size(1))
    item_emb = item_emb.detach()

    def loss_of(idx):
        a = gate(h_s[idx], h_l[idx], dt[idx])
        fused = a * h_s[idx] + (1 - a) * h_l[idx]
        return F.cross_entropy(fused @ item_emb.T, target[idx])

    return _fit(gate, loss_of, len(target), cfg.gate_epochs, 256, 2e-3, 0.05, cfg, "gate")
