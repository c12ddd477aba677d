"""ONNX export of the five graphs, then a separate parity check against torch.

Names and dynamic axes come from `streams.bundle` (the contract the runtime reads).
`export()` writes a graph; `validate()` runs it in onnxruntime beside torch on random
batches of several sizes and lengths, with padding, and lists every output out of tolerance.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streams.bundle import (FUSION, LONG_TERM, LONG_TERM_HEAD, SHORT_TERM, TEXT_ENCODER,
                            OnnxSignature)
from streams.inference import make_session

log = logging.getLogger(__name__)
OPSET = 17
TOLERANCE = 1e-4


def export(module: torch.nn.Module, example: tuple, signature: OnnxSignature, path: Path) -> Path:
    """Export `module` in eval mode (the wrapper itself, see below) to `path`."""
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(signature.inputs),
            output_names=list(signature.outputs),
            dynamic_axes=signature.dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    # torch.onnx.export restores the wrapper's training mode afterwards: put it back in eval
    # so that a caller comparing against torch does not get dropout noise.
    module.eval()
    return path


@dataclass
class Mismatch:
    case: str
    output: str
    max_abs_diff: float


def validate(module: torch.nn.Module, path: Path, signature: OnnxSignature,
             cases: dict[str, tuple], atol: float = TOLERANCE) -> list[Mismatch]:
    """Compare ONNX and torch on each named case; return every output out of tolerance."""
    module.eval()
    session = make_session(path, threads=2)
    mismatches = []
    for name, inputs in cases.items():
        with torch.no_grad():
            expected = module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {n: t.numpy() for n, t in zip(signature.inputs, inputs)}
        got = session.run(list(signature.outputs), feeds)
        for out_name, e, g in zip(signature.outputs, expected, got):
            e = e.numpy()
            if e.shape != g.shape:
                mismatches.append(Mismatch(name, f"{out_name} shape {g.shape}!={e.shape}", np.inf))
                continue
            if out_name == "top_rows":  # ties may order differently; compare the scores
                continue
            diff = float(np.max(np.abs(e.astype(np.float64) - g))) if e.size else 0.0
            if diff > atol:
                mismatches.append(Mismatch(name, out_name, diff))
    return mismatches


def random_padded_rows(batch: int, length: int, n_rows: int, gen: torch.Generator):
    """Left-padded random sequences of random real lengths 1..length, and their mask."""
    rows = torch.randint(1, n_rows, (batch, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).float()
    return rows * mask.long(), mask


def short_term_cases(n_rows: int, max_len: int, seed: int = 0) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(seed)
    cases = {}
    for batch, length in [(1, 1), (1, max_len), (3, 7), (32, max_len), (64, 13)]:
        cases[f"B{batch}xT{length}"] = random_padded_rows(batch, length, n_rows, gen)
    return cases


def text_encoder_cases(vocab: int, seed: int = 0) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(seed)
    cases = {}
    for batch, length in [(1, 5), (4, 16), (16, 40)]:
        ids = torch.randint(1000, vocab, (batch, length), generator=gen)
        lengths = torch.randint(2, length + 1, (batch,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids[:, 0] = 101  # [CLS]
        cases[f"B{batch}xL{length}"] = (ids * mask, mask)
    return cases


def fusion_cases(n_rows: int, d_model: int, max_k: int, seed: int = 0) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(seed)
    cases = {}
    for batch, hist in [(1, 1), (4, 10), (32, 50)]:
        for mode_index in range(3):
            h_s = torch.randn(batch, d_model, generator=gen)
            h_l = torch.randn(batch, d_model, generator=gen)
            has_long = (torch.rand(batch, 1, generator=gen) > 0.3).float()
            hist_e = torch.randn(batch, hist, d_model, generator=gen)
            hist_rows, hist_mask = random_padded_rows(batch, hist, n_rows, gen)
            dt = torch.rand(batch, 1, generator=gen) * 10
            seen = (torch.rand(batch, n_rows, generator=gen) > 0.9).float()
            mode = torch.eye(3)[mode_index]
            alpha = torch.tensor([0.3])
            item_weight = torch.tensor([(0.0, 0.7, 2.0)[mode_index]])
            # at most the fewest unseen rows of a case: past them the top-k takes masked rows,
            # tied, which torch and onnxruntime may pick differently (small catalogs)
            unseen = int((seen < 0.5).sum(1).min())
            k = torch.tensor([1 + (batch + hist + mode_index) % max(1, min(max_k, unseen))],
                             dtype=torch.int64)
            cases[f"B{batch}xN{hist}m{mode_index}"] = (
                h_s, h_l, has_long, hist_e, hist_rows, hist_mask, dt, seen, mode, alpha,
                item_weight, k)
    return cases


def long_term_cases(n_rows: int, window: int, seed: int = 0) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(seed)
    cases = {}
    for batch, length in [(1, 1), (1, window), (3, 7), (16, window), (64, 37)]:
        rows, mask = random_padded_rows(batch, length, n_rows, gen)
        weights = mask * (0.2 + torch.rand(batch, length, generator=gen))  # event weights vary
        cases[f"B{batch}xW{length}"] = (rows, weights)
    return cases


def long_term_head_cases(d_in: int, seed: int = 0) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(seed)
    return {f"B{b}": (torch.randn(b, d_in, generator=gen) * 0.1,) for b in (1, 5, 64)}


def export_all(short_term, text_encoder, fusion, out: Path, n_rows: int, d_model: int,
               max_len: int, vocab: int, long_term, long_term_head) -> dict[str, list[Mismatch]]:
    """Export the five graphs into `out` and validate each; return mismatches by graph."""
    st_cases = short_term_cases(n_rows, max_len)
    te_cases = text_encoder_cases(vocab)
    fu_cases = fusion_cases(n_rows, d_model, fusion.max_k)
    lt_cfg = long_term.model.cfg
    plan = [  # (file, module, signature, cases, the case traced for export)
        ("short_term.onnx", short_term, SHORT_TERM, st_cases, "B3xT7"),
        ("text_encoder.onnx", text_encoder, TEXT_ENCODER, te_cases, "B1xL5"),
        ("fusion.onnx", fusion, FUSION, fu_cases, "B4xN10m2"),
        ("long_term.onnx", long_term, LONG_TERM, long_term_cases(n_rows, lt_cfg.window), "B3xW7"),
        ("long_term_head.onnx", long_term_head, LONG_TERM_HEAD,
         long_term_head_cases(lt_cfg.d_model), "B5"),
    ]
    report = {}
    for filename, module, signature, cases, traced in plan:
        export(module, cases[traced], signature, out / filename)
        report[filename] = validate(module, out / filename, signature, cases)
    return report
