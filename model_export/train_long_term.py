"""Training the long-term model and choosing its settings and the fusion on the validation split.

Examples are (user, t): the tower reads the newest `window` items before position t and
predicts item t through the GPT's (frozen) item embeddings, so h_l lives in the space the
fusion scores in. The pooled tower's served lag is 0: the worker brings the refreshed vector
up to date with every event since the refresh (`streams.inference.LongTermUpdater`), so it
trains on the next item. The BERT kind is served as refreshed, some events old, so each of its
inputs predicts the next `future_targets` items (PinnerFormer's dense all-action loss, for
the same reason): it trains on every lag from 0 to future_targets - 1, and one encoding
serves that many examples. Evaluation reports other lags (`evaluate --long-term-lag`).

Every choice (half-life, text input, epochs) is made on the validation item of each user,
which neither model trained on; the test item is never looked at here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .gpt import ItemGPT
from .long_term import LongTermConfig, LongTermModel, recency_weights

log = logging.getLogger(__name__)


@dataclass
class LongTermTrainConfig:
    max_epochs: int = 40
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    epoch_examples: int = 32_768  # an "epoch" is this many random examples: finer stopping
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.01
    half_lives: tuple[float, ...] = (1e9, 50.0)  # candidates (items), picked on validation
    use_text: tuple[bool, ...] = (True, False)  # text input on or off, picked on validation
    ema_decay: float | None = 0.95  # per step; validated and served: the weights' moving mean
    # the BERT kind: each input predicts this many next items (served stale, see above); its
    # positions by age already express recency, so it is trained at one half-life (the first)
    future_targets: int = 8
    seed: int = 0
    progress: bool = True


def left_window(seq: np.ndarray, end: int, window: int) -> np.ndarray:
    """The newest `window` items of seq[:end], left-padded with row 0."""
    w = seq[max(0, end - window):max(end, 0)]
    return np.concatenate([np.zeros(window - len(w), np.int64), w])


def batch_inputs(seqs: list[np.ndarray], examples: np.ndarray, window: int, lag: int = 0
                 ) -> torch.Tensor:
    """(M, 2) examples (user index, target position) -> (M, T) rows known `lag` events
    before the target, left-padded; T = the longest input, at most `window` (padding has
    weight 0, so a narrower batch computes the same vectors, faster)."""
    width = max(1, min(window, int(examples[:, 1].max()) - lag)) if len(examples) else 1
    return torch.from_numpy(np.stack([left_window(seqs[u], t - lag, width) for u, t in examples]))


def future_targets(seqs: list[np.ndarray], examples: np.ndarray, n: int) -> torch.Tensor:
    """(M, n) items t .. t+n-1 of each (user, t) example; -100 (ignored) past a sequence's end."""
    out = np.full((len(examples), n), -100, np.int64)
    for i, (u, t) in enumerate(examples):
        ahead = seqs[u][t:t + n]
        out[i, :len(ahead)] = ahead
    return torch.from_numpy(out)


def train_examples(seqs: list[np.ndarray]) -> np.ndarray:
    """(M, 2) every (user, target position >= 1), in user then position order."""
    lengths = np.array([max(len(s) - 1, 0) for s in seqs], dtype=np.int64)
    users = np.repeat(np.arange(len(seqs), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths  # each user's first example
    positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths) + 1
    return np.stack([users, positions], axis=1)


def ndcg_at_10(h: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor,
               seen: list[np.ndarray], chunk: int = 1024) -> float:
    """Mean NDCG@10 of the users' vectors `h` (U, D) scored against every item, seen items
    excluded; `chunk` users at a time, so that no (users x items) matrix is ever whole."""
    gains = []
    for start in range(0, len(h), chunk):
        scores = h[start:start + chunk] @ item_emb.T  # (chunk, n_rows)
        mask = seen_mask(seen[start:start + chunk], scores.size(1))
        gains.append(ndcg_gains(scores, targets[start:start + chunk], mask))
    return float(torch.cat(gains).mean())


def seen_mask(seen: list[np.ndarray], n_rows: int) -> torch.Tensor:
    """(U, n_rows) True for each user's seen rows and for row 0 (padding): never ranked."""
    mask = torch.zeros(len(seen), n_rows, dtype=torch.bool)
    mask[:, 0] = True
    for i, rows in enumerate(seen):
        mask[i, torch.from_numpy(rows)] = True
    return mask


def ndcg_gains(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(U,) each user's NDCG@10 of `targets` under `scores` (U, n_rows), masked rows excluded."""
    scores = scores.masked_fill(mask, NEG_INF)
    rank = 1 + (scores > scores.gather(1, targets[:, None])).sum(1)
    return torch.where(rank <= 10, 1.0 / torch.log2(rank.float() + 1), 0.0)


NEG_INF = -1e30


@dataclass
class Validation:
    """Each user's validation case: the training sequence as input, the validation item."""

    seqs: list[np.ndarray]  # the full training sequence per validation user
    targets: torch.Tensor
    seen: list[np.ndarray]
    h_s: torch.Tensor  # the GPT's short-term vector after the training sequence

    @classmethod
    def build(cls, gpt: ItemGPT, seqs: list[list[int]], targets: list[int]) -> "Validation":
        arrays = [np.asarray(s, np.int64) for s in seqs]
        return cls(arrays, torch.tensor(targets), [np.unique(s) for s in arrays],
                   last_h_s(gpt, arrays, np.array([(i, len(s)) for i, s in enumerate(arrays)])))

    def h_l(self, model: LongTermModel, lag: int = 0) -> torch.Tensor:
        ex = np.array([(i, len(s)) for i, s in enumerate(self.seqs)])
        return encode(model, self.seqs, ex, lag)


@torch.no_grad()
def encode(model: LongTermModel, seqs: list[np.ndarray], examples: np.ndarray, lag: int = 0,
           batch: int = 1024) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(examples), batch):
        rows = batch_inputs(seqs, examples[start:start + batch], model.cfg.window, lag)
        out.append(model(rows, recency_weights((rows > 0).float(), model.cfg.half_life)))
    return torch.cat(out)


def train_tower(cfg: LongTermConfig, text_emb: torch.Tensor, item_emb: torch.Tensor,
                seqs: list[np.ndarray], val: Validation | None, tcfg: LongTermTrainConfig
                ) -> tuple[LongTermModel, float, int]:
    """Next-item training of one configuration with early stopping on validation NDCG@10 of
    the tower alone; returns (best model, its validation NDCG@10, its epoch). Without `val`
    (the refit on everything known) it runs `tcfg.max_epochs` and keeps the last. With
    `tcfg.ema_decay` the model validated and returned is the moving mean of the weights."""
    torch.manual_seed(tcfg.seed)
    model = LongTermModel(cfg, text_emb)
    examples = train_examples(seqs)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    gen = np.random.default_rng(tcfg.seed)
    best, best_state, best_epoch, epoch = -1.0, None, 0, 0
    item_emb = item_emb.detach()
    ema = None if tcfg.ema_decay is None else AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema_decay))
    served = model if ema is None else ema.module  # what is validated and returned
    n_targets = 1 if cfg.incremental else tcfg.future_targets
    for epoch in range(1, tcfg.max_epochs + 1):
        model.train()
        order = gen.permutation(len(examples))[:tcfg.epoch_examples // n_targets]
        bar = tqdm(total=len(order), desc=f"long-term e{epoch}", unit="ex", leave=False,
                   disable=not tcfg.progress)
        for start in range(0, len(order), tcfg.batch_size):
            ex = examples[order[start:start + tcfg.batch_size]]
            rows = batch_inputs(seqs, ex, cfg.window)
            targets = future_targets(seqs, ex, n_targets)  # (B, n_targets)
            h_l = model(rows, recency_weights((rows > 0).float(), cfg.half_life))  # (B, D)
            logits = (h_l @ item_emb.T)[:, None].expand(-1, n_targets, -1)  # (B, n, n_rows)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            bar.update(len(ex))
        bar.close()
        if val is None:
            continue
        score = ndcg_at_10(val.h_l(served), item_emb, val.targets, val.seen)
        log.info("long-term %s epoch %d: validation NDCG@10 %.4f", _describe(cfg), epoch, score)
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in served.state_dict().items()}
        elif epoch - best_epoch >= tcfg.patience:
            break
    if val is None:
        model.load_state_dict(served.state_dict())
        return model.eval(), float("nan"), epoch
    model.load_state_dict(best_state)
    return model.eval(), best, best_epoch


def _describe(cfg: LongTermConfig) -> str:
    hl = "inf" if cfg.half_life >= 1e8 else f"{cfg.half_life:g}"
    return f"(layers={cfg.n_layer}, half_life={hl}, text={cfg.use_text})"


@torch.no_grad()
def best_fixed_alpha(h_s: torch.Tensor, h_l: torch.Tensor, item_emb: torch.Tensor,
                     val: Validation) -> tuple[float, float]:
    """The fixed mode's short-term weight with the best validation NDCG@10, and that NDCG."""
    best, best_alpha = -1.0, 1.0
    for alpha in [i / 20 for i in range(21)]:
        score = ndcg_at_10(alpha * h_s + (1 - alpha) * h_l, item_emb, val.targets, val.seen)
        if score > best + 1e-9:
            best, best_alpha = score, alpha
    return best_alpha, best


@dataclass
class LongTermChoice:
    model: LongTermModel
    valid: dict  # validation NDCG@10 of each candidate and of the GPT alone
    seconds: float
    epochs: int  # the chosen one's best epoch: what the refit on everything known runs


def choose_long_term(base: LongTermConfig, text_emb: torch.Tensor, gpt: ItemGPT,
                     seqs: list[list[int]], val: Validation, tcfg: LongTermTrainConfig
                     ) -> LongTermChoice:
    """Train each candidate configuration; keep the one with the best validation NDCG@10
    alone (its fused score with the GPT is reported beside it). The fused scores of the
    candidates differ by less than their noise, and picking by them served towers stopped
    after one epoch; the weights that fuse it are chosen afterwards on the fused score."""
    started = time.time()
    item_emb = gpt.item_embeddings.detach()
    arrays = [np.asarray(s, np.int64) for s in seqs]
    gpt_only = ndcg_at_10(val.h_s, item_emb, val.targets, val.seen)
    report, best = {"gpt": round(gpt_only, 4)}, None
    half_lives = tcfg.half_lives if base.incremental else tcfg.half_lives[:1]
    for half_life in half_lives:
        for use_text in tcfg.use_text:
            cfg = replace(base, half_life=half_life, use_text=use_text)
            model, alone, epochs = train_tower(cfg, text_emb, item_emb, arrays, val, tcfg)
            alpha, fused = best_fixed_alpha(val.h_s, val.h_l(model), item_emb, val)
            report[_describe(cfg)] = {"alone": round(alone, 4), "fused": round(fused, 4),
                                      "alpha": alpha, "epochs": epochs}
            log.info("long-term %s: alone %.4f, fused %.4f at alpha %.2f (gpt %.4f)",
                     _describe(cfg), alone, fused, alpha, gpt_only)
            if best is None or alone > best[0]:
                best = (alone, model, epochs)
    return LongTermChoice(best[1], report, round(time.time() - started, 1), best[2])


def refit_tower(choice: LongTermChoice, text_emb: torch.Tensor, item_emb: torch.Tensor,
                seqs: list[list[int]], tcfg: LongTermTrainConfig) -> LongTermModel:
    """The chosen configuration trained again, for its chosen number of epochs, on every
    sequence known at serving time, against the refit GPT's item embeddings."""
    arrays = [np.asarray(s, np.int64) for s in seqs]
    model, _, _ = train_tower(choice.model.cfg, text_emb, item_emb, arrays, None,
                              replace(tcfg, max_epochs=choice.epochs))
    return model


@torch.no_grad()
def held_out_examples(gpt: ItemGPT, model: LongTermModel, seqs: list[list[int]],
                      times: list[list[int]], tail: int):
    """(h_s, h_l, dt, target) at each user's last `tail` training positions, which neither
    tower trained on: the gate learns from vectors as they are at serving time."""
    arrays = [np.asarray(s, np.int64) for s in seqs]
    examples = np.array([(u, t) for u, s in enumerate(arrays) if len(s) > 2 * tail
                         for t in range(len(s) - tail, len(s))], dtype=np.int64)
    if len(examples) == 0:  # no history longer than 2 x tail: each user's last position
        log.warning("no user has more than %d training items: the gate learns from each "
                    "user's last position, which the towers trained on", 2 * tail)
        examples = np.array([(u, len(s) - 1) for u, s in enumerate(arrays) if len(s) >= 2],
                            dtype=np.int64).reshape(-1, 2)
    h_s = last_h_s(gpt, arrays, examples)
    h_l = encode(model, arrays, examples)
    dt = torch.tensor([[np.log1p(max(times[u][t - 1] - times[u][t - 2], 0)) if t > 1 else 0.0]
                       for u, t in examples], dtype=torch.float32)
    target = torch.from_numpy(np.array([arrays[u][t] for u, t in examples]))
    return h_s, h_l, dt, target


@torch.no_grad()
def last_h_s(gpt: ItemGPT, seqs: list[np.ndarray], examples: np.ndarray, batch: int = 1024
             ) -> torch.Tensor:
    """(M, D) the GPT's short-term vector before each (user, position) example."""
    gpt.eval()
    out = []
    for start in range(0, len(examples), batch):
        rows = batch_inputs(seqs, examples[start:start + batch], gpt.cfg.max_len)
        out.append(gpt(rows, (rows > 0).float(), last_only=True)[:, -1])
    return torch.cat(out)
