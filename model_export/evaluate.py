"""Offline evaluation of an exported bundle, through `streams.inference` (what the worker runs).

Leave-one-out test split, full ranking over all items with the user's seen items excluded.
Rows: popularity, bert (long-term only), gpt (short-term only), fused_fixed, fused_attention,
fused_gate; plus bert_text and fused_gate_text for the text-profile long-term construction.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from streams.bundle import load_bundle
from streams.inference import LongTermEncoder, Recommender
from streams.quality import summarize

from . import data

log = logging.getLogger(__name__)
K = 10
ROWS = ("popularity", "bert", "gpt", "fused_fixed", "fused_attention", "fused_gate",
        "bert_text", "fused_gate_text")


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray, seen: list[list[int]]) -> np.ndarray:
    """1-based rank of each target among unseen real items; ties broken by row (lower first)."""
    scores = scores.astype(np.float64).copy()
    scores[:, 0] = -np.inf
    for i, rows in enumerate(seen):
        scores[i, rows] = -np.inf
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    rows = np.arange(scores.shape[1])[None, :]
    ahead = (scores > target_scores) | ((scores == target_scores) & (rows < targets[:, None]))
    return 1 + ahead.sum(axis=1)


def test_cases(bundle, dataset: data.Dataset):
    """(history rows, history ts, target row) per test user; unknown items skipped and counted."""
    split = data.leave_one_out(dataset)
    row_of, cases, skipped = bundle.items.row_of, [], {}
    for user, target in split.test.items():
        history = split.train[user] + [split.valid[user]]
        if target.item_id not in row_of:
            skipped["unknown_target_item"] = skipped.get("unknown_target_item", 0) + 1
            continue
        rows = [row_of[it.item_id] for it in history if it.item_id in row_of]
        if len(rows) != len(history):
            skipped["unknown_history_item"] = skipped.get("unknown_history_item", 0) + 1
        if not rows:
            skipped["empty_history"] = skipped.get("empty_history", 0) + 1
            continue
        ts = [it.ts for it in history if it.item_id in row_of]
        cases.append((rows, ts, row_of[target.item_id]))
    return cases, skipped


def evaluate(bundle_dir: str | Path, dataset: data.Dataset, batch_size: int = 256,
             fixed_alpha: float | None = None, progress: bool = True,
             rows: tuple[str, ...] = ROWS) -> dict:
    bundle = load_bundle(bundle_dir)
    rec = Recommender(bundle, threads=2)
    lt = LongTermEncoder(bundle, threads=2, with_text_encoder=any("text" in r for r in rows))
    item_emb = bundle.array("item_emb")
    # What the worker passes: the user's recent items as its state keeps them (SHORT_TERM_LEN,
    # 50 by default, the fusion's training history `hist_len`); the GPT reads the newest max_len.
    recent_len = int(bundle.dims["hist_len"])
    alpha = bundle.manifest.get("fixed_alpha", 0.5) if fixed_alpha is None else fixed_alpha
    cases, skipped = test_cases(bundle, dataset)
    if not cases:
        raise data.DataError(f"no test users to evaluate (skipped: {skipped})")
    ranks = {name: [] for name in rows}
    top = {name: [] for name in rows}
    bar = tqdm(total=len(cases), desc="evaluate", unit="user", disable=not progress)
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        histories = [c[0] for c in batch]
        seqs = [h[-recent_len:] for h in histories]
        dts = [(c[1][-1] - c[1][-2]) if len(c[1]) > 1 else 0.0 for c in batch]
        targets = np.array([c[2] for c in batch])
        seen = [sorted(set(h)) for h in histories]
        long_vecs = {"pooled": lt.encode(histories, "pooled")}
        if any("text" in r for r in rows):
            long_vecs["text"] = lt.encode(histories, "text")
        for name in rows:
            if name == "popularity":
                scores = np.tile(rec.popularity, (len(batch), 1))
                top_rows, _ = rec.popular(seen, K)
            else:
                mode, a, longs = _plan(name, alpha, long_vecs, len(batch))
                out = rec.recommend(seqs, longs, dts, seen, mode, a, K)
                scores, top_rows = out.fused @ item_emb.T, out.rows
            ranks[name].extend(ranks_from_scores(scores, targets, seen).tolist())
            top[name].extend(top_rows.tolist())
        bar.update(len(batch))
    bar.close()
    n_items = bundle.items.n_rows - 1
    return {
        "dataset": dataset.name,
        "bundle": bundle.version,
        "n_users": len(cases),
        "skipped": skipped,
        "models": {name: summarize(ranks[name], top[name], n_items, K) for name in rows},
    }


def _plan(name: str, alpha: float, long_vecs: dict, batch: int):
    construction = "text" if name.endswith("_text") else "pooled"
    vecs = list(long_vecs[construction]) if construction in long_vecs else [None] * batch
    if name == "gpt":
        return "fixed", 1.0, [None] * batch
    if name.startswith("bert"):
        return "fixed", 0.0, vecs
    mode = name.split("_")[1]
    return mode, alpha, vecs


def print_table(result: dict) -> str:
    lines = [f"dataset={result['dataset']} users={result['n_users']} bundle={result['bundle']}",
             f"{'model':<18}{'HR@10':>8}{'NDCG@10':>9}{'MRR':>8}{'Cov@10':>8}"]
    for name, m in result["models"].items():
        lines.append(f"{name:<18}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}{m['mrr']:>8.4f}"
                     f"{m['coverage@10']:>8.3f}")
    text = "\n".join(lines)
    print(text)
    return text


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("hr@10", "ndcg@10", "mrr")):
        ax.bar(names, [result["models"][n][metric] for n in names], color="#4477aa")
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(f"{result['dataset']} ({result['n_users']} users), leave-one-out test")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def save(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
