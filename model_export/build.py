"""Build a model bundle from an interaction log: train, export, validate, evaluate, write."""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from streams.bundle import FILES, write_manifest
from streams.errors import InterestStreamError

from . import bert, data, export, item_item, train
from . import train_long_term as tlt
from .evaluate import K as EVAL_K
from .fusion import FusionHead
from .gpt import GPTConfig, ShortTermHead
from .long_term import LongTermConfig, LongTermGraph, LongTermHeadGraph

log = logging.getLogger(__name__)
MAX_K = 100  # the most items a recommendation can hold (fewer in a smaller catalog)
HIST_LEN = 50


class BuildError(InterestStreamError):
    """The bundle could not be built (bad data, or the ONNX graphs failed their parity check)."""


def item_records(ds: data.Dataset) -> list[dict]:
    ids = sorted(ds.items, key=data._natural)
    return [{"item_id": i, "title": ds.items[i]["title"], "text": ds.items[i]["text"]} for i in ids]


def validation_cases(gpt, split: data.Split, row_of: dict) -> tlt.Validation:
    """Each user's validation item after its whole training sequence (unknown items skipped)."""
    users = [u for u in split.valid if split.valid[u].item_id in row_of]
    seqs = [[row_of[it.item_id] for it in split.train[u] if it.item_id in row_of] for u in users]
    keep = [i for i, s in enumerate(seqs) if s]
    return tlt.Validation.build(gpt, [seqs[i] for i in keep],
                                [row_of[split.valid[users[i]].item_id] for i in keep])


def user_rows(split: data.Split, row_of: dict, with_valid: bool = False
              ) -> tuple[list[list[int]], list[list[int]]]:
    """Each user's rows and times of the training split, and with `with_valid` the validation
    item after them: all that is known when the user's test item comes."""
    seqs, times = [], []
    for user, history in split.train.items():
        known = history + ([split.valid[user]] if with_valid and user in split.valid else [])
        seqs.append([row_of[it.item_id] for it in known])
        times.append([it.ts for it in known])
    return seqs, times


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim): torch frees a phase's tensors
    into malloc's arenas, where they count in the process's RSS until the next phase's
    allocations happen to reuse them. Elsewhere a no-op."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(dataset: data.Dataset, out: Path, gpt_cfg: dict | None = None,
          train_cfg: train.TrainConfig | None = None, fusion_mode: str = "fixed",
          fixed_alpha: float | None = None, evaluate_after: bool = True,
          long_cfg: dict | None = None, long_train: tlt.LongTermTrainConfig | None = None,
          item_cfg: item_item.ItemItemConfig | None = None,
          evaluate_rows: tuple[str, ...] | None = None) -> dict:
    """Train everything on `dataset`'s training split and write a bundle into `out`; with
    `evaluate_after`, score it on the test split (`evaluate_rows`, default all)."""
    started = time.time()
    train_cfg = train_cfg or train.TrainConfig()
    long_train = long_train or tlt.LongTermTrainConfig(seed=train_cfg.seed,
                                                       progress=train_cfg.progress)
    torch.manual_seed(train_cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    split = data.leave_one_out(dataset)
    records = item_records(dataset)
    row_of = {r["item_id"]: row for row, r in enumerate(records, start=1)}
    n_rows = len(records) + 1
    if n_rows - 1 <= EVAL_K:
        raise BuildError(f"{dataset.name}: {n_rows - 1} items; a recommender needs more than "
                         f"{EVAL_K} (the evaluation ranks the top {EVAL_K})")
    seqs, times = user_rows(split, row_of)

    tokenizer, bert_model = bert.load_minilm()
    text_head = bert.TextEncoderHead(bert_model).eval()
    texts = [r["text"] for r in records]
    with tqdm(total=len(texts), desc="BERT items", unit="item", disable=not train_cfg.progress) as bar:
        item_text = bert.encode_texts(text_head, tokenizer, texts, progress=bar)
    text_emb = np.vstack([np.zeros((1, item_text.shape[1]), np.float32), item_text])
    release_freed_memory()  # the BERT's activations: ~300 MB the training never reuses

    cfg = GPTConfig(n_rows=n_rows, **(gpt_cfg or {}))
    tail = train_cfg.held_out_tail
    # 1. choices on validation, with models fit on the training split minus each user's tail
    fit_seqs = [s[:-tail] if len(s) > 2 * tail else s for s in seqs]  # the tail: for the gate
    gpt = train.train_gpt(fit_seqs, cfg, train_cfg)
    val = validation_cases(gpt, split, row_of)
    base = LongTermConfig(n_rows=n_rows, d_text=int(text_emb.shape[1]), d_out=cfg.d_model,
                          **(long_cfg or {}))
    choice = tlt.choose_long_term(base, torch.from_numpy(text_emb), gpt, fit_seqs, val, long_train)
    long_model = choice.model
    # the item-item model's regularisation and weight, with the fixed mode's alpha beside it:
    # chosen together on the fused validation score
    item_cfg = item_cfg or item_item.ItemItemConfig()
    items = item_item.choose(fit_seqs, n_rows, HIST_LEN, val.h_s, val.h_l(long_model),
                             gpt.item_embeddings.detach(), val.seqs, val.targets, val.seen,
                             item_cfg, seed=train_cfg.seed)
    item_table = items.table
    if fixed_alpha is None:
        fixed_alpha = items.fixed_alpha
    if train_cfg.refit:
        # 2. what is served is trained on everything known before the test item (training
        # split + validation item) with the choices of step 1: the models learn the newest
        # behaviour, which the long-term tower needs most
        seqs, times = user_rows(split, row_of, with_valid=True)
        gpt = train.train_gpt(seqs, cfg, train_cfg)
        long_model = tlt.refit_tower(choice, torch.from_numpy(text_emb), gpt.item_embeddings,
                                     seqs, long_train)
        item_table = item_item.fit(seqs, n_rows, items.l2_scale, item_cfg)
    # the gate learns from each user's last `tail` positions; without the refit neither model
    # trained on them, with it both did (the gate is not the default mode)
    gate = train.train_gate(gpt.item_embeddings,
                            *tlt.held_out_examples(gpt, long_model, seqs, times, tail), train_cfg)
    popularity = np.bincount([r for s in seqs for r in s], minlength=n_rows).astype(np.float32)
    # the founding article's text baselines: a projection of the pooled BERT vectors
    examples = train.projection_examples(seqs, text_emb, train_cfg.half_life, cfg.max_len,
                                         train_cfg.projection_examples, train_cfg.seed)
    proj = train.train_projection(gpt, examples, text_emb.shape[1], train_cfg)

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        item_long = proj(torch.from_numpy(text_emb)).numpy()
        long_item_in = long_model.item_inputs().numpy()
    max_k = min(MAX_K, n_rows - 1)
    fusion_head = FusionHead(gpt.item_embeddings, gate, max_k, torch.from_numpy(item_table.rows),
                             torch.from_numpy(item_table.weights),
                             item_item.decay_of(items.half_life))
    report = export.export_all(ShortTermHead(gpt), text_head, fusion_head, out, n_rows,
                               cfg.d_model, cfg.max_len, tokenizer.vocab_size,
                               LongTermGraph(long_model), LongTermHeadGraph(long_model))
    bad = {name: m for name, m in report.items() if m}
    if bad:
        raise BuildError(f"ONNX parity failed (max abs diff > {export.TOLERANCE}): {bad}")
    del text_head, bert_model  # exported; the evaluation runs the ONNX graph

    np.save(out / FILES["long_item_in"], long_item_in.astype(np.float32))
    np.save(out / FILES["item_text_emb"], text_emb)
    np.save(out / FILES["item_long_emb"], item_long.astype(np.float32))
    np.save(out / FILES["item_emb"], gpt.item_embeddings.detach().numpy().astype(np.float32))
    np.save(out / FILES["popularity"], popularity)
    np.savez(out / FILES["item_neighbours"], rows=item_table.rows, weights=item_table.weights)
    np.savez(out / FILES["projection"], W=proj.linear.weight.detach().numpy().T.copy(),
             b=proj.linear.bias.detach().numpy())
    shutil.copy(bert.minilm_dir() / "tokenizer.json", out / FILES["tokenizer"])
    # the torch weights with their config (nanoGPT style): for benchmarks and fine-tuning;
    # not part of the runtime contract, which reads only the ONNX graphs
    torch.save({"config": cfg.to_dict(), "state_dict": gpt.state_dict()}, out / "gpt.pt")
    torch.save({"config": long_model.cfg.to_dict(), "state_dict": long_model.state_dict()},
               out / "long_term.pt")
    (out / FILES["items"]).write_text(json.dumps(records))
    data_hash = dataset.content_hash()
    manifest = {
        "version": f"{dataset.name}-{data_hash[:8]}-{time.strftime('%Y%m%dT%H%M%S')}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": dataset.name,
        "data_hash": data_hash,
        "dims": {"d_model": cfg.d_model, "d_text": int(text_emb.shape[1]), "n_items": n_rows - 1,
                 "max_len": cfg.max_len, "max_k": max_k, "hist_len": HIST_LEN},
        "gpt": cfg.to_dict(),
        "train": asdict(train_cfg),
        "default_fusion_mode": fusion_mode,
        "fixed_alpha": fixed_alpha,
        "item_item": {"weight": items.weight, "l2_scale": items.l2_scale, "l2": item_table.l2,
                      "half_life": items.half_life,
                      "window": HIST_LEN, "config": item_cfg.to_dict(), "validation": items.valid},
        "long_term": {"construction": "model", "half_life": train_cfg.half_life,
                      "profile_items": 30,
                      "model": {**long_model.cfg.to_dict(),
                                "incremental": long_model.cfg.incremental},
                      "train": asdict(long_train),
                      "validation": choice.valid, "train_seconds": choice.seconds,
                      "epochs": choice.epochs, "refit": train_cfg.refit},
        "parity": {name: "ok" for name in report},
        "skipped_input": dataset.skipped,
        # the ranking's universe: every catalog item, chosen in the log or not
        "items": {"ranked": n_rows - 1, "never_in_log": data.never_chosen(dataset)},
        "metrics": {},
    }
    manifest["build_seconds"] = round(time.time() - started, 1)
    write_manifest(out, manifest)
    if evaluate_after:
        from .evaluate import evaluate

        release_freed_memory()
        metrics = evaluate(out, dataset, progress=train_cfg.progress, rows=evaluate_rows)
        manifest["metrics"] = metrics["models"]
        manifest["paired_vs_gpt"] = metrics["paired_vs_gpt"]
        manifest["evaluation_protocol"] = metrics["protocol"]
        manifest["build_seconds"] = round(time.time() - started, 1)
        write_manifest(out, manifest)
    log.info("bundle %s written to %s in %.1fs", manifest["version"], out, time.time() - started)
    return manifest
