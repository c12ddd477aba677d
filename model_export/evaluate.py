"""Offline evaluation of an exported bundle, through `streams.inference` (what the worker runs).

Leave-one-out test split, full ranking over all items with the user's seen items excluded
(`mask_history`: all of them, or only the newest N). Rows:

- popularity; gpt (short-term only);
- long_pooled / long_bert: the bundle's long-term model alone (its kind names the row);
- item_item: the item-item model alone, over the user's recent window;
- gpt_item_item: the GPT and the item-item model (no long-term vector);
- fused_fixed, fused_attention, fused_gate: the three fusion modes over that model, each with
  the item-item scores at the bundle's weight: what is served;
- bert, bert_text: the founding article's text-only long-term vectors (pooled item
  embeddings, a text profile), alone; bert_text over a seeded sample of users when there
  are more than `Protocol.text_profile_users` (the BERT over each profile is the slow part).

`lag`: the long-term model sees the history up to `lag` events before the target, as a
refresh that old leaves it; with `update` the worker's per-event update adds those events
back (`Recommender.long_update`), as served. `lag="replay"` draws each user's lag from the
log's own timestamps: the events in the last `refresh_s` seconds before the target, with the
refresh at a uniform moment of its period.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from streams.bundle import load_bundle
from streams.inference import LongTermEncoder, LongTermUpdate, Recommender
from streams.quality import summarize

from . import data

log = logging.getLogger(__name__)
K = 10
FUSED = ("fused_fixed", "fused_attention", "fused_gate")
BASELINES = ("popularity", "gpt", "bert", "bert_text")


@dataclass(frozen=True)
class Protocol:
    """How the test cases are scored; recorded in the result."""

    mask_history: str = "all"  # "all" | "window:N"
    lag: int | str = 0  # events missing from the long-term input; or "replay"
    update: bool = True  # add the missing events back with the worker's update
    refresh_s: float = 30.0  # the refresh period behind lag="replay"
    seed: int = 0
    # bert_text runs the BERT over 256 tokens per user (~40 ms each here): a seeded sample
    # of this many users beyond it, compared with the GPT on the same users
    text_profile_users: int = 2000

    def masked(self, history: list[int]) -> list[int]:
        if self.mask_history == "all":
            return sorted(set(history))
        kind, _, n = self.mask_history.partition(":")
        if kind != "window" or not n.isdigit():
            raise data.DataError(f"mask_history {self.mask_history!r}: use all or window:N")
        return sorted(set(history[-int(n):]))


def _n_layer(bundle) -> int:
    return int(bundle.manifest.get("long_term", {}).get("model", {}).get("n_layer", 0))


def long_row_name(bundle) -> str:
    return "long_bert" if _n_layer(bundle) > 0 else "long_pooled"


def default_rows_for(n_layer: int) -> tuple[str, ...]:
    """Every row, for a bundle whose long-term model has `n_layer` encoder layers."""
    long_row = "long_bert" if n_layer > 0 else "long_pooled"
    return ("popularity", "gpt", long_row, "item_item", "gpt_item_item", *FUSED, "bert",
            "bert_text")


def default_rows(bundle) -> tuple[str, ...]:
    return default_rows_for(_n_layer(bundle))


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
    """(history rows, history ts, target row, target ts) per test user; unknown items skipped
    and counted."""
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
        cases.append((rows, ts, row_of[target.item_id], target.ts))
    return cases, skipped


def lags_for(cases, protocol: Protocol) -> list[int]:
    """Each case's number of events the long-term input misses."""
    if protocol.lag != "replay":
        return [int(protocol.lag)] * len(cases)
    rng = random.Random(protocol.seed)
    lags = []
    for rows, ts, _, target_ts in cases:
        since = target_ts - rng.random() * protocol.refresh_s  # the last refresh
        lags.append(sum(1 for t in ts if t > since))
    return lags


def long_inputs(lt: LongTermEncoder, histories, lags, update: bool):
    """(h_l per case, worker updates or None) with each long-term input `lag` events old."""
    refreshed = [h[:len(h) - lag] if lag else h for h, lag in zip(histories, lags)]
    present = [i for i, h in enumerate(refreshed) if h]
    vecs: list = [None] * len(histories)
    updates: list = [None] * len(histories)
    if present:
        parts = lt.model_parts([refreshed[i] for i in present])
        for j, i in enumerate(present):
            vecs[i] = parts.h_l[j]
            if update and parts.pooled is not None and lags[i]:
                newer = histories[i][len(histories[i]) - lags[i]:]
                updates[i] = LongTermUpdate(parts.pooled[j], float(parts.weight[j]),
                                            [(r, 1.0) for r in newer])
    return vecs, (updates if update and lt.incremental else None)


def evaluate(bundle_dir: str | Path, dataset: data.Dataset, batch_size: int = 256,
             fixed_alpha: float | None = None, progress: bool = True,
             rows: tuple[str, ...] | None = None, protocol: Protocol = Protocol(),
             keep_ranks: bool = False) -> dict:
    """Every row's metrics on the test split; with `keep_ranks`, also each fully scored row's
    rank per test case (`"ranks"`, in case order) for pairing across runs."""
    bundle = load_bundle(bundle_dir)
    rows = rows or default_rows(bundle)
    rec = Recommender(bundle, threads=2)
    lt = LongTermEncoder(bundle, threads=2, with_text_encoder="bert_text" in rows)
    item_emb = bundle.array("item_emb")
    # What the worker passes: the user's recent items as its state keeps them (SHORT_TERM_LEN,
    # 50 by default, the fusion's training history `hist_len`); the GPT reads the newest max_len.
    recent_len = int(bundle.dims["hist_len"])
    alpha = bundle.manifest.get("fixed_alpha", 0.5) if fixed_alpha is None else fixed_alpha
    cases, skipped = test_cases(bundle, dataset)
    if not cases:
        raise data.DataError(f"no test users to evaluate (skipped: {skipped})")
    lags = lags_for(cases, protocol)
    profiled = profile_sample(len(cases), protocol)
    ranks = {name: {} for name in rows}  # case index -> rank
    top = {name: [] for name in rows}
    bar = tqdm(total=len(cases), desc="evaluate", unit="user", disable=not progress)
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        histories = [c[0] for c in batch]
        seqs = [h[-recent_len:] for h in histories]
        dts = [(c[1][-1] - c[1][-2]) if len(c[1]) > 1 else 0.0 for c in batch]
        targets = np.array([c[2] for c in batch])
        seen = [protocol.masked(h) for h in histories]
        model_vecs, updates = long_inputs(lt, histories, lags[start:start + batch_size],
                                          protocol.update)
        for name in rows:
            which = np.arange(len(batch))  # the batch's cases this row scores
            if name == "popularity":
                scores = np.tile(rec.popularity, (len(batch), 1))
                top_rows, _ = rec.popular(seen, K)
            else:
                if name == "bert_text" and profiled is not None:
                    which = np.array([j for j in which if start + j in profiled], dtype=np.int64)
                    if not len(which):
                        continue
                pick = ((lambda xs: [xs[j] for j in which]) if len(which) < len(batch)
                        else (lambda xs: xs))
                mode, a, longs, upd, ii = _plan(name, alpha, lt, pick(histories),
                                                pick(model_vecs),
                                                None if updates is None else pick(updates),
                                                rec.d_model)
                out = rec.recommend(pick(seqs), longs, pick(dts), pick(seen), mode, a, K, upd,
                                    item_item_weight=ii)
                scores, top_rows = out.fused @ item_emb.T, out.rows
                if ii != 0.0:  # the item-item share, in full for the ranks
                    scores = scores + rec.item_item_scores(pick(seqs), ii)
            for j, rank in zip(which, ranks_from_scores(scores, targets[which],
                                                        [seen[j] for j in which]).tolist()):
                ranks[name][start + int(j)] = rank
            top[name].extend(top_rows.tolist())
        bar.update(len(batch))
    bar.close()
    n_items = bundle.items.n_rows - 1
    kept = ({"ranks": {name: [ranks[name][i] for i in range(len(cases))] for name in rows
                       if len(ranks[name]) == len(cases)}} if keep_ranks else {})
    return {**kept,
        "dataset": dataset.name,
        "bundle": bundle.version,
        "n_users": len(cases),
        "skipped": skipped,
        "protocol": {**asdict(protocol), "split": "leave-one-out", "k": K,
                     "mean_lag": round(float(np.mean(lags)), 3), "fixed_alpha": alpha,
                     "users_per_row": {name: len(ranks[name]) for name in rows}},
        "models": {name: summarize(list(ranks[name].values()), top[name], n_items, K)
                   for name in rows},
        # each row against the GPT on the users both were scored for
        "paired_vs_gpt": {name: paired_gain(list(ranks[name].values()),
                                            [ranks["gpt"][i] for i in ranks[name]])
                          for name in rows if name != "gpt" and "gpt" in rows},
    }


def profile_sample(n_cases: int, protocol: Protocol) -> set[int] | None:
    """The cases the text-profile row is scored for: all (None) up to the protocol's cap."""
    if n_cases <= protocol.text_profile_users:
        return None
    return set(random.Random(protocol.seed).sample(range(n_cases), protocol.text_profile_users))


def _plan(name: str, alpha: float, lt: LongTermEncoder, histories, model_vecs, updates,
          d_model: int):
    """(mode, alpha, long-term vectors, updates, item-item weight or None: the bundle's) of
    one row."""
    none = [None] * len(histories)
    if name == "gpt":
        return "fixed", 1.0, none, None, 0.0
    if name == "gpt_item_item":
        return "fixed", 1.0, none, None, None
    if name == "item_item":  # a zero long-term vector in full: the item-item scores alone
        zero = np.zeros(d_model, np.float32)
        return "fixed", 0.0, [zero] * len(histories), None, 1.0
    if name == "bert":
        return "fixed", 0.0, list(lt.encode(histories, "pooled")), None, 0.0
    if name == "bert_text":
        return "fixed", 0.0, list(lt.encode(histories, "text")), None, 0.0
    if name.startswith("long_"):
        return "fixed", 0.0, model_vecs, updates, 0.0
    if name in FUSED:
        return name.split("_")[1], alpha, model_vecs, updates, None
    raise data.DataError(f"unknown evaluation row {name!r}")


def _ndcg_gains(ranks) -> np.ndarray:
    return np.array([1.0 / math.log2(r + 1) if r <= K else 0.0 for r in ranks])


def paired_gain(ranks: list[int], base: list[int]) -> dict:
    """Mean per-user NDCG@10 difference against `base`, relative to base's mean, with a 95 %
    normal interval over users."""
    return _relative_interval(_ndcg_gains(ranks), _ndcg_gains(base))


def pooled_paired_gain(runs: list[tuple[list[int], list[int]]]) -> dict:
    """`paired_gain` of the mean over runs (e.g. seeds): each user's NDCG@10 is averaged over
    the runs' (ranks, base) first, so the interval over users is the one of the runs' mean."""
    if len({len(r) for pair in runs for r in pair}) != 1:
        raise ValueError("pooled_paired_gain: every run must rank the same users")
    gains = np.mean([_ndcg_gains(r) for r, _ in runs], axis=0)
    base = np.mean([_ndcg_gains(b) for _, b in runs], axis=0)
    return _relative_interval(gains, base)


def _relative_interval(gains: np.ndarray, base: np.ndarray) -> dict:
    diff = gains - base
    mean_base = float(base.mean()) or 1e-12
    half = 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    return {"gain": round(float(diff.mean()) / mean_base, 4),
            "ci95": [round((float(diff.mean()) - half) / mean_base, 4),
                     round((float(diff.mean()) + half) / mean_base, 4)]}


LAG_SETTINGS = (("lag 0", Protocol()),
                ("replay, refreshed only", Protocol(lag="replay", update=False)),
                ("replay, refreshed + per-event update", Protocol(lag="replay", update=True)),
                ("5 events, refreshed only", Protocol(lag=5, update=False)),
                ("5 events, refreshed + per-event update", Protocol(lag=5, update=True)))


def lag_table(bundle_dir, dataset: data.Dataset, refresh_s: float = 30.0, seed: int = 0,
              mask_history: str = "all", progress: bool = False) -> list[dict]:
    """The fused model against the GPT alone with the long-term input as fresh as serving
    leaves it: `replay` draws each user's staleness from the log's timestamps and the refresh
    period; `5 events` is a fixed, harsher one."""
    bundle = load_bundle(bundle_dir, verify=False)
    rows = ("gpt", long_row_name(bundle), "fused_fixed")
    out = []
    for name, proto in LAG_SETTINGS:
        proto = Protocol(mask_history=mask_history, lag=proto.lag, update=proto.update,
                         refresh_s=refresh_s, seed=seed)
        r = evaluate(bundle_dir, dataset, progress=progress, rows=rows, protocol=proto)
        out.append({"setting": name, "mean_lag": r["protocol"]["mean_lag"],
                    **{row: round(r["models"][row]["ndcg@10"], 4) for row in rows},
                    "fused_vs_gpt": r["paired_vs_gpt"]["fused_fixed"]})
    return out


def print_lag_table(table: list[dict]) -> str:
    long_row = next(k for k in table[0] if k.startswith("long_"))
    lines = [f"{'long-term input':<40}{'mean lag':>9}{'gpt':>8}{long_row:>13}{'fused':>8}  fused vs gpt",]
    for t in table:
        p = t["fused_vs_gpt"]
        lines.append(f"{t['setting']:<40}{t['mean_lag']:>9.2f}{t['gpt']:>8.4f}{t[long_row]:>13.4f}"
                     f"{t['fused_fixed']:>8.4f}  {p['gain']:+.1%} ({p['ci95'][0]:+.1%} .. "
                     f"{p['ci95'][1]:+.1%})")
    text = "\n".join(lines)
    print(text)
    return text


def print_table(result: dict) -> str:
    protocol = result.get("protocol", {})
    lines = [f"dataset={result['dataset']} users={result['n_users']} bundle={result['bundle']}",
             "protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()),
             f"{'model':<18}{'HR@10':>8}{'NDCG@10':>9}{'MRR':>8}{'Cov@10':>8}  vs gpt (95% CI)"]
    paired = result.get("paired_vs_gpt", {})
    for name, m in result["models"].items():
        vs = ""
        if name in paired:
            p = paired[name]
            vs = f"  {p['gain']:+.1%} ({p['ci95'][0]:+.1%} .. {p['ci95'][1]:+.1%})"
        lines.append(f"{name:<18}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}{m['mrr']:>8.4f}"
                     f"{m['coverage@10']:>8.3f}{vs}")
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
