"""Training: the GPT on next-item prediction, then the projection and gate with the GPT frozen."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fusion import InterestGate, LongTermProjection, attention_weight
from .gpt import GPTConfig, ItemGPT

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    fusion_epochs: int = 6
    half_life: float = 20.0
    seed: int = 0
    progress: bool = True


def windows(sequences: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each row sequence into left-padded (input, target) windows of at most max_len."""
    inputs, targets = [], []
    for seq in sequences:
        for end in range(len(seq), 1, -max_len):
            w = seq[max(0, end - max_len - 1):end]
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
class FusionExamples:
    h_s: torch.Tensor  # (M, D)
    pooled: torch.Tensor  # (M, E)
    hist: torch.Tensor  # (M, N) left-padded item rows
    dt: torch.Tensor  # (M, 1)
    target: torch.Tensor  # (M,)


@torch.no_grad()
def fusion_examples(gpt: ItemGPT, sequences: list[list[int]], times: list[list[int]],
                    text_emb: np.ndarray, half_life: float, hist_len: int) -> FusionExamples:
    """One example per (user, position >= 1): everything known after item t-1, target item t."""
    gpt.eval()
    max_len = gpt.cfg.max_len
    h_s, pooled, hist, dt, target = [], [], [], [], []
    for seq, ts in zip(sequences, times):
        if len(seq) < 2:
            continue
        prefixes = pooled_prefixes(seq, text_emb, half_life)
        for end in range(len(seq), 1, -max_len):
            start = max(0, end - max_len - 1)
            w = seq[start:end - 1]  # inputs; targets are seq[start+1:end]
            x = torch.tensor([[0] * (max_len - len(w)) + w])
            hidden = gpt(x, (x > 0).float())[0, max_len - len(w):]  # (len(w), C)
            for j in range(len(w)):
                t = start + j  # newest known item index
                h_s.append(hidden[j])
                pooled.append(prefixes[t])
                recent = seq[max(0, t + 1 - hist_len):t + 1]
                hist.append([0] * (hist_len - len(recent)) + recent)
                dt.append(np.log1p(max(ts[t] - ts[t - 1], 0)) if t > 0 else 0.0)
                target.append(seq[t + 1])
    return FusionExamples(
        torch.stack(h_s), torch.from_numpy(np.stack(pooled)), torch.tensor(hist),
        torch.tensor(dt, dtype=torch.float32)[:, None], torch.tensor(target))


def train_fusion(gpt: ItemGPT, ex: FusionExamples, text_emb: np.ndarray, cfg: TrainConfig):
    """Train the projection (BERT -> GPT space) and the gate jointly; the GPT stays frozen.

    Loss = CE(gate-fused scores) + CE(long-term-only scores) + CE(attention-fused scores):
    the projection must make h_l useful alone and inside every fusion mode.
    """
    torch.manual_seed(cfg.seed)
    d_model, d_text = gpt.cfg.d_model, text_emb.shape[1]
    proj, gate = LongTermProjection(d_text, d_model), InterestGate(d_model)
    item_emb = gpt.item_embeddings.detach()  # (n_rows, D)
    text = torch.from_numpy(text_emb)
    params = list(proj.parameters()) + list(gate.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=cfg.weight_decay)
    batch = 512
    steps = cfg.fusion_epochs * ((len(ex.target) + batch - 1) // batch)
    bar = tqdm(total=steps, desc="fusion", disable=not cfg.progress, unit="step")
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.fusion_epochs):
        order = torch.randperm(len(ex.target), generator=gen)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            h_s, h_l = ex.h_s[idx], proj(ex.pooled[idx])
            hist = ex.hist[idx]
            hist_e = proj(text[hist])  # (B, N, D)
            a_gate = gate(h_s, h_l, ex.dt[idx])
            a_att = attention_weight(h_s, h_l, hist_e, (hist > 0).float())
            y = ex.target[idx]
            loss = sum(F.cross_entropy(v @ item_emb.T, y) for v in (
                a_gate * h_s + (1 - a_gate) * h_l, h_l, a_att * h_s + (1 - a_att) * h_l))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return proj.eval(), gate.eval()
