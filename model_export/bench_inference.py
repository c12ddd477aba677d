"""GPT per event: onnxruntime (what the worker runs) against torch, at several batch sizes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from streams.bundle import load_bundle
from streams.inference import ShortTermEncoder

from .gpt import GPTConfig, ItemGPT, ShortTermHead


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def bench_inference(bundle_dir: str | Path, batches=(1, 32, 256), threads: int = 1) -> dict:
    bundle = load_bundle(bundle_dir)
    ort_encoder = ShortTermEncoder(bundle, threads=threads)
    saved = torch.load(Path(bundle_dir) / "gpt.pt", weights_only=True)
    head = ShortTermHead(ItemGPT(GPTConfig(**saved["config"]))).eval()
    head.gpt.load_state_dict(saved["state_dict"])
    torch.set_num_threads(threads)
    max_len, n_rows = int(bundle.dims["max_len"]), bundle.items.n_rows
    rng = np.random.default_rng(0)
    out = {"threads": threads, "length": max_len}
    for batch in batches:
        seqs = rng.integers(1, n_rows, size=(batch, max_len)).tolist()
        rows = torch.tensor(seqs)
        mask = torch.ones(batch, max_len)
        repeats = max(3, 2000 // batch)
        with torch.no_grad():
            t_torch = _time(lambda: head(rows, mask), repeats)
        t_ort = _time(lambda: ort_encoder.encode(seqs), repeats)
        out[f"batch_{batch}"] = {"ort_us_per_event": round(t_ort / batch * 1e6, 1),
                                 "torch_us_per_event": round(t_torch / batch * 1e6, 1),
                                 "speedup": round(t_torch / t_ort, 2)}
    return out
