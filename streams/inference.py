"""onnxruntime sessions over a bundle: numpy in, numpy out. No Kafka, no Redis.

The worker and the offline evaluation both go through `Recommender`, so what is measured
offline is what is served.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnxruntime as ort

from streams.bundle import (FUSION, FUSION_MODES, LONG_TERM, LONG_TERM_HEAD, MASKED_SCORE,
                            SHORT_TERM, TEXT_ENCODER, Bundle)
from streams.errors import BundleError

log = logging.getLogger(__name__)


def make_session(path, threads: int = 1, arena: bool = True) -> ort.InferenceSession:
    """`arena` False: each run's buffers go back to the allocator (memory, not speed, for
    a graph whose peak buffers are large and rarely needed)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise BundleError(f"cannot load ONNX model {path}: {exc}") from exc


def pad_left(sequences: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad row sequences to a (B, T) matrix (T = longest, <= max_len) and its mask."""
    length = max(1, min(max_len, max((len(s) for s in sequences), default=1)))
    rows = np.zeros((len(sequences), length), dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.float32)
    for i, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        if seq:
            rows[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = 1.0
    return rows, mask


class ShortTermEncoder:
    """The GPT over a user's recent items: row sequences -> h_s (B, D)."""

    def __init__(self, bundle: Bundle, threads: int = 1):
        self.session = make_session(bundle.file("short_term"), threads)
        self.max_len = int(bundle.dims["max_len"])

    def encode(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        return self.encode_padded(*pad_left(sequences, self.max_len))

    def encode_padded(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.run(self.feeds(rows, mask))

    def feeds(self, rows: np.ndarray, mask: np.ndarray) -> dict:
        """Left-padded (B, T) rows and mask; the GPT reads the newest max_len columns."""
        return {"item_rows": rows[:, -self.max_len:], "mask": mask[:, -self.max_len:]}

    def run(self, feeds: dict) -> np.ndarray:
        # One call per batch. Calls of 32 rows are ~30% faster per sequence alone (the
        # attention tensors stay in cache) but slower in the worker: after each call the
        # inference thread waits for the GIL held by the event loop (throughput 5,030 -> 4,630).
        (h_s,) = self.session.run(list(SHORT_TERM.outputs), feeds)
        return h_s


class TextEncoder:
    """The BERT (MiniLM-L6) text encoder: texts -> L2-normalised embeddings (B, E)."""

    def __init__(self, bundle: Bundle, threads: int = 1, max_tokens: int = 256):
        from tokenizers import Tokenizer

        # its attention buffers (batch x heads x tokens x tokens) would stay in the arena
        self.session = make_session(bundle.file("text_encoder"), threads, arena=False)
        self.tokenizer = Tokenizer.from_file(str(bundle.file("tokenizer")))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.dim = int(bundle.dims["d_text"])

    def encode(self, texts: Sequence[str], batch: int = 32) -> np.ndarray:
        """`batch` texts per call: the attention's (batch, heads, tokens, tokens) tensors
        are what onnxruntime's arena keeps at its peak, so a large batch only costs memory."""
        out = []
        for start in range(0, len(texts), batch):
            encodings = self.tokenizer.encode_batch(list(texts[start:start + batch]))
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            (emb,) = self.session.run(
                list(TEXT_ENCODER.outputs), {"input_ids": ids, "attention_mask": mask}
            )
            out.append(emb)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def recency_weights(n: int, half_life: float) -> np.ndarray:
    """0.5 ** (age / half_life) for n items, oldest first (the newest has age 0)."""
    return 0.5 ** (np.arange(n - 1, -1, -1, dtype=np.float32) / np.float32(half_life))


@dataclass
class LongTermParts:
    """The long-term model's output for a batch of histories. For an incremental model the
    weighted mean `pooled` and its total weight let a worker add newer events later."""

    h_l: np.ndarray  # (B, D)
    pooled: np.ndarray | None  # (B, C)
    weight: np.ndarray | None  # (B,)


class LongTermEncoder:
    """A user's history -> long-term vector h_l in the GPT's space.

    `model`: long_term.onnx over the newest `window` items (the build's long-term model).
    The founding article's constructions, kept as evaluated baselines: `pooled` averages the
    items' BERT embeddings with recency weights and projects the mean; `text` runs the BERT
    once over a text profile of the history.
    """

    def __init__(self, bundle: Bundle, threads: int = 1, with_text_encoder: bool = True):
        lt = bundle.manifest.get("long_term", {})
        self.construction = lt.get("construction", "model")
        self.half_life = float(lt.get("half_life", 20.0))  # of the `pooled` baseline
        self.profile_items = int(lt.get("profile_items", 30))
        model = lt.get("model", {})
        self.window = int(model.get("window", 200))
        self.model_half_life = float(model.get("half_life", 1e9))
        self.incremental = bool(model.get("incremental", False))
        self.session = make_session(bundle.file("long_term"), threads)
        self.item_text_emb = bundle.array("item_text_emb").astype(np.float32)
        self.W, self.b = bundle.projection()
        self.texts = bundle.items.texts
        self.text_encoder = TextEncoder(bundle, threads) if with_text_encoder else None

    def project(self, emb: np.ndarray) -> np.ndarray:
        return (emb @ self.W + self.b).astype(np.float32)

    def model_parts(self, histories: Sequence[Sequence[int]],
                    event_weights: Sequence[Sequence[float]] | None = None) -> LongTermParts:
        """long_term.onnx over each history's newest `window` items."""
        rows = np.zeros((len(histories), self.window), dtype=np.int64)
        weights = np.zeros((len(histories), self.window), dtype=np.float32)
        for i, history in enumerate(histories):
            h = np.asarray(history[-self.window:], dtype=np.int64)
            if not len(h):
                continue
            w = recency_weights(len(h), self.model_half_life)
            if event_weights is not None:
                w = w * np.asarray(event_weights[i][-self.window:], dtype=np.float32)
            rows[i, self.window - len(h):], weights[i, self.window - len(h):] = h, w
        h_l, pooled = self.session.run(list(LONG_TERM.outputs),
                                       {"item_rows": rows, "weights": weights})
        if not self.incremental:
            return LongTermParts(h_l, None, None)
        return LongTermParts(h_l, pooled, weights.sum(1))

    def pooled(self, histories: Sequence[Sequence[int]],
               event_weights: Sequence[Sequence[float]] | None = None) -> np.ndarray:
        """Recency-weighted mean of the items' BERT vectors, times each event type's weight."""
        out = np.zeros((len(histories), self.item_text_emb.shape[1]), dtype=np.float32)
        for i, rows in enumerate(histories):
            if not len(rows):
                continue
            weights = recency_weights(len(rows), self.half_life)
            if event_weights is not None:
                weights = weights * np.asarray(event_weights[i], dtype=np.float32)
            vec = weights @ self.item_text_emb[np.asarray(rows)]
            out[i] = vec / max(float(np.linalg.norm(vec)), 1e-8)
        return self.project(out)

    def text_profile(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        if self.text_encoder is None:
            raise BundleError("the text construction needs text_encoder.onnx; load it")
        texts = ["; ".join(self.texts[r - 1] for r in reversed(rows[-self.profile_items:]))
                 for rows in histories]
        return self.project(self.text_encoder.encode(texts))

    def encode(self, histories: Sequence[Sequence[int]], construction: str | None = None,
               event_weights: Sequence[Sequence[float]] | None = None):
        construction = construction or self.construction
        if construction == "model":
            return self.model_parts(histories, event_weights).h_l
        if construction == "pooled":
            return self.pooled(histories, event_weights)
        if construction == "text":
            return self.text_profile(histories)
        raise BundleError(f"unknown long-term construction {construction!r} (model | pooled | text)")


class LongTermUpdater:
    """Brings an incremental long-term vector up to date with the events since its refresh.

    The refresher stored the weighted mean `pooled` of the user's item inputs and its total
    weight; each newer event ages the old weights by one step and adds its own item input.
    The head then maps the new mean to h_l (`run`, onnxruntime: the inference thread).
    Recomputing from the whole history gives the same vector up to the items that left the
    window meanwhile."""

    def __init__(self, bundle: Bundle, threads: int = 1):
        model = bundle.manifest.get("long_term", {}).get("model", {})
        self.enabled = bool(model.get("incremental", False))
        self.decay = np.float32(0.5 ** (1.0 / float(model.get("half_life", 1e9))))
        self.item_in = bundle.array("long_item_in").astype(np.float32) if self.enabled else None
        self.session = make_session(bundle.file("long_term_head"), threads) if self.enabled else None

    def pooled(self, base: np.ndarray, base_weight: np.ndarray, rows: np.ndarray,
               weights: np.ndarray) -> np.ndarray:
        """base (M, C) means of total weight base_weight (M,); rows, weights (M, K) the newer
        events, left-padded (weight 0), newest last -> the up-to-date means (M, C)."""
        k = (weights > 0).sum(1).astype(np.float32)  # events added (ages every older one)
        aged = self.decay ** np.arange(rows.shape[1] - 1, -1, -1, dtype=np.float32)  # (K,)
        w = weights * aged[None, :]  # (M, K)
        old = self.decay ** k * base_weight  # (M,)
        total = old + w.sum(1)
        added = np.einsum("mk,mkc->mc", w, self.item_in[rows])  # (M, C)
        return ((old[:, None] * base + added) / np.maximum(total, 1e-6)[:, None]).astype(np.float32)

    def run(self, pooled: np.ndarray) -> np.ndarray:
        (h_l,) = self.session.run(list(LONG_TERM_HEAD.outputs), {"pooled": pooled})
        return h_l


def item_item_scores(table_rows: np.ndarray, table_w: np.ndarray, rows: np.ndarray,
                     mask: np.ndarray, decay: float, n_rows: int) -> np.ndarray:
    """(B, n_rows) float32: each row's successors' weights summed over the left-padded window
    `rows` (B, N), newest last, each item weighted decay ** age (fusion.onnx's sum)."""
    age = np.arange(rows.shape[1] - 1, -1, -1, dtype=np.float32)  # 0 for the newest
    recency = mask * np.float32(decay) ** age  # (B, N)
    to = table_rows[rows] + (np.arange(len(rows)) * n_rows)[:, None, None]  # (B, N, K)
    w = table_w[rows] * recency[:, :, None]
    out = np.bincount(to.ravel(), weights=w.ravel(), minlength=len(rows) * n_rows)
    return out.reshape(len(rows), n_rows).astype(np.float32)


@dataclass
class RecommendationBatch:
    fused: np.ndarray  # (B, D)
    alpha: np.ndarray  # (B,) short-term weight
    rows: np.ndarray  # (B, K) item rows, best first
    scores: np.ndarray  # (B, K)
    item_item: np.ndarray  # (B, K) the item-item model's share of each score
    h_s: np.ndarray | None = None  # (B, D) the short-term vector, for the explanations

    def short_term_parts(self, item_emb: np.ndarray) -> np.ndarray:
        """(B, K) the short-term share alpha * h_s . e of each top score; with the item-item
        share, the rest of the score, (1 - alpha) * h_l . e, is the long-term share."""
        dots = np.einsum("bd,bkd->bk", self.h_s, item_emb[self.rows])
        return self.alpha[:, None] * dots


@dataclass
class LongTermUpdate:
    """A refreshed vector's pooled mean and weight, and the (row, weight) events after it."""

    pooled: np.ndarray  # (C,)
    weight: float
    events: Sequence[tuple[int, float]]  # oldest first


class InterestFuser:
    """fusion.onnx: (h_s, h_l, extras) -> fused vector, alpha and top-K with seen items masked."""

    def __init__(self, bundle: Bundle, threads: int = 1):
        self.session = make_session(bundle.file("fusion"), threads)
        self.item_long_emb = bundle.array("item_long_emb").astype(np.float32)
        self.n_rows = bundle.items.n_rows
        self.max_k = int(bundle.dims["max_k"])
        self.item_item_weight = float(bundle.manifest.get("item_item", {}).get("weight", 0.0))

    def feeds(
        self,
        h_l: np.ndarray,
        has_long: np.ndarray,
        hist_rows: np.ndarray,
        hist_mask: np.ndarray,
        dt_s: np.ndarray,
        seen_mask: np.ndarray,
        mode: str,
        fixed_alpha: float,
        k: int,
        item_item_weight: float | None = None,
    ) -> dict:
        """fusion.onnx's inputs except h_s (the GPT's output); `item_item_weight` None: the
        bundle's."""
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {mode!r} is not one of {FUSION_MODES}")
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k={k} must lie in [1, {self.max_k}] for this bundle")
        f32 = np.float32  # np.asarray: no copy when the caller's array is float32 already
        return {
            "h_l": np.asarray(h_l, dtype=f32),
            "has_long": np.asarray(has_long, dtype=f32).reshape(-1, 1),
            "hist_e": np.take(self.item_long_emb, hist_rows, axis=0),  # (B, N, D)
            "hist_rows": np.asarray(hist_rows, dtype=np.int64),
            "hist_mask": hist_mask,
            "dt": np.log1p(np.maximum(dt_s, 0.0)).reshape(-1, 1).astype(f32),
            "seen_mask": np.asarray(seen_mask, dtype=f32),
            "mode": np.eye(3, dtype=np.float32)[FUSION_MODES.index(mode)],
            "fixed_alpha": np.array([fixed_alpha], dtype=np.float32),
            "item_item_weight": np.array([self.item_item_weight if item_item_weight is None
                                          else item_item_weight], dtype=np.float32),
            "k": np.array([k], dtype=np.int64),
        }

    def run(self, h_s: np.ndarray, feeds: dict) -> RecommendationBatch:
        fused, alpha, scores, rows, item_item = self.session.run(
            list(FUSION.outputs), {"h_s": h_s.astype(np.float32), **feeds})
        return RecommendationBatch(fused, alpha.reshape(-1), rows, scores, item_item)


@dataclass
class ScoringInputs:
    """The two ONNX calls' inputs. Building them is Python work that holds the GIL; running
    them is not, so the worker builds them on its event loop and runs them in a thread."""

    short_term: dict
    fusion: dict  # k (items per user) included
    long_update: tuple[np.ndarray, np.ndarray] | None = None  # (batch rows, pooled means)


class Recommender:
    """Everything the worker and the offline evaluation need to score a batch of users."""

    def __init__(self, bundle: Bundle, threads: int = 1):
        self.bundle = bundle
        self.short_term = ShortTermEncoder(bundle, threads)
        self.fuser = InterestFuser(bundle, threads)
        self.popularity = bundle.array("popularity").astype(np.float32)
        self.d_model = int(bundle.dims["d_model"])
        self.updater = LongTermUpdater(bundle, threads)
        self.item_emb = bundle.array("item_emb").astype(np.float32)  # (n_rows, D), as fusion.onnx
        self.neighbours: tuple[np.ndarray, np.ndarray] | None = None  # read on first use

    def item_item_scores(self, sequences: Sequence[Sequence[int]], weight: float | None = None
                         ) -> np.ndarray:
        """(B, n_rows) the item-item share of every item's score, as fusion.onnx adds it
        (numpy; the offline evaluation ranks every item with it)."""
        if self.neighbours is None:
            self.neighbours = self.bundle.item_neighbours()
        half_life = float(self.bundle.manifest.get("item_item", {}).get("half_life", 1e9))
        rows, mask = pad_left(sequences, 10_000)
        factor = self.fuser.item_item_weight if weight is None else weight
        return factor * item_item_scores(*self.neighbours, rows, mask, 0.5 ** (1.0 / half_life),
                                         self.bundle.items.n_rows)

    def seen_mask(self, seen: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, n_rows) 1.0 for each user's seen rows and for row 0 (padding, never an item)."""
        return self.seen_mask_padded(pad_left(seen, 10_000)[0])

    def seen_mask_padded(self, rows: np.ndarray) -> np.ndarray:
        """seen_mask of rows already left-padded with row 0, (B, N)."""
        mask = np.zeros((len(rows), self.bundle.items.n_rows), dtype=np.float32)
        mask[:, 0] = 1.0
        mask[np.arange(len(rows))[:, None], rows] = 1.0  # one scatter, not a loop per user
        return mask

    def recommend(
        self,
        sequences: Sequence[Sequence[int]],
        long_vecs: Sequence[np.ndarray | None],
        dt_s: Sequence[float],
        seen: Sequence[Sequence[int]] | None,
        mode: str,
        fixed_alpha: float,
        k: int,
        updates: Sequence[LongTermUpdate | None] | None = None,
        item_item_weight: float | None = None,
    ) -> RecommendationBatch:
        """Score a batch: `sequences` are recent item rows (oldest first), one per user; `seen`
        the rows never to recommend to each, None for the sequences' own rows; `updates` the
        events to add to each user's refreshed long-term vector (incremental models);
        `item_item_weight` None: the bundle's."""
        return self.score(self.inputs(sequences, long_vecs, dt_s, seen, mode, fixed_alpha, k,
                                      updates, item_item_weight))

    def inputs(self, sequences, long_vecs, dt_s, seen, mode, fixed_alpha, k,
               updates=None, item_item_weight=None) -> ScoringInputs:
        rows, mask = pad_left(sequences, 10_000)  # padded once: the GPT's input and attention's N
        h_l = np.zeros((len(sequences), self.d_model), dtype=np.float32)
        has_long = np.zeros(len(sequences), dtype=np.float32)
        for i, vec in enumerate(long_vecs):
            if vec is not None and vec.shape == (self.d_model,):
                h_l[i], has_long[i] = vec, 1.0
        # seen None: the sequences' rows, already padded, serve the mask too (the worker's case)
        seen_mask = self.seen_mask_padded(rows) if seen is None else self.seen_mask(seen)
        return ScoringInputs(
            self.short_term.feeds(rows, mask),
            self.fuser.feeds(h_l, has_long, rows, mask, np.asarray(dt_s, dtype=np.float32),
                             seen_mask, mode, fixed_alpha, k, item_item_weight),
            self.long_update(updates) if updates is not None else None)

    def long_update(self, updates: Sequence[LongTermUpdate | None]
                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The up-to-date pooled means of the batch rows that have newer events (numpy on
        the caller's thread; the head runs in `score`)."""
        if not self.updater.enabled:
            return None
        which = [i for i, u in enumerate(updates) if u is not None and u.events]
        if not which:
            return None
        width = max(len(updates[i].events) for i in which)
        rows = np.zeros((len(which), width), dtype=np.int64)
        weights = np.zeros((len(which), width), dtype=np.float32)
        for j, i in enumerate(which):
            events = updates[i].events
            rows[j, width - len(events):] = [r for r, _ in events]
            weights[j, width - len(events):] = [w for _, w in events]
        base = np.stack([updates[i].pooled for i in which])
        base_weight = np.array([updates[i].weight for i in which], dtype=np.float32)
        return np.array(which), self.updater.pooled(base, base_weight, rows, weights)

    def score(self, inputs: ScoringInputs) -> RecommendationBatch:
        """The GPT, then the fusion and top-K: onnxruntime only (it releases the GIL)."""
        if inputs.long_update is not None:
            which, pooled = inputs.long_update
            inputs.fusion["h_l"][which] = self.updater.run(pooled)
            inputs.fusion["has_long"][which] = 1.0
        h_s = self.short_term.run(inputs.short_term)
        batch = self.fuser.run(h_s, inputs.fusion)
        batch.h_s = h_s
        return batch

    def check(self, mode: str, fixed_alpha: float, k: int) -> None:
        """One warm-up batch through every graph (with and without a long-term vector, and
        through the per-event update when the model has one); a bundle whose graphs do not run
        or give non-finite scores raises BundleError."""
        rows = [[1], [1, min(2, self.bundle.items.n_rows - 1)]]
        update = None
        if self.updater.enabled:
            width = self.updater.item_in.shape[1]
            update = [None, LongTermUpdate(np.zeros(width, np.float32), 1.0, [(1, 1.0)])]
        try:
            batch = self.recommend(rows, [None, np.zeros(self.d_model, np.float32)], [0.0, 1.0],
                                   None, mode, fixed_alpha, k, update)
        except Exception as exc:
            raise BundleError(f"bundle {self.bundle.version} does not run: "
                              f"{type(exc).__name__}: {exc}") from exc
        finite = batch.scores[batch.scores > MASKED_SCORE / 2]
        if batch.rows.shape != (2, min(k, self.bundle.items.n_rows)) or not np.all(np.isfinite(finite)) \
                or not np.all(np.isfinite(batch.fused)):
            raise BundleError(f"bundle {self.bundle.version} gives no finite top-{k} for a "
                              "warm-up batch; rebuild it")

    def popular(self, seen: Sequence[Sequence[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cold start: the most popular items the user has not seen."""
        scores = np.where(self.seen_mask(seen) > 0, -np.inf, self.popularity[None, :])
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return rows, np.take_along_axis(scores, rows, axis=1)
