"""The quality benchmark (not a test): full ml-100k builds over several seeds, mean and spread.

`python -m model_export quality --seeds 0 1 2 --json artifacts/quality.json`
"""
from __future__ import annotations

import statistics
from pathlib import Path

from streams.bundle import load_bundle

from . import data
from .build import build
from .evaluate import evaluate, pooled_paired_gain
from .train import TrainConfig

FUSED_ROWS = ("fused_fixed", "fused_gate")


def quality(dataset: data.Dataset, seeds: list[int], out_dir: Path, rebuild: bool = True,
            long_cfg: dict | None = None) -> dict:
    """Build (or with `rebuild=False` re-read) one bundle per seed under `out_dir`;
    `long_cfg` overrides the long-term model's configuration (e.g. {"n_layer": 2})."""
    runs = {}
    for seed in seeds:
        manifest = (build(dataset, out_dir / f"seed{seed}",
                          train_cfg=TrainConfig(seed=seed, progress=False),
                          long_cfg=long_cfg) if rebuild
                    else load_bundle(out_dir / f"seed{seed}").manifest)
        runs[seed] = {name: m["ndcg@10"] for name, m in manifest["metrics"].items()}
        runs[seed]["build_seconds"] = manifest["build_seconds"]
        runs[seed]["fixed_alpha"] = manifest["fixed_alpha"]
        runs[seed]["paired_vs_gpt"] = manifest.get("paired_vs_gpt", {})
        runs[seed]["long_term"] = {k: manifest["long_term"]["model"][k]
                                   for k in ("half_life", "n_layer", "use_text", "window")}
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in runs[seed].items()
                                           if isinstance(v, float)), flush=True)
    names = [n for n, v in runs[seeds[0]].items()
             if isinstance(v, float) and n not in ("build_seconds", "fixed_alpha")]
    summary = {name: {"mean": statistics.mean(r[name] for r in runs.values()),
                      "std": statistics.pstdev(r[name] for r in runs.values())} for name in names}
    fused = {n: summary[n]["mean"] for n in names if n.startswith("fused")}
    best = max(fused, key=fused.get)
    gain = fused[best] / summary["gpt"]["mean"] - 1.0
    return {"dataset": dataset.name, "seeds": seeds, "ndcg@10": summary, "runs": runs,
            "best_fused": best, "best_fused_gain_vs_gpt": round(gain, 4),
            "best_fused_paired_by_seed": {s: runs[s]["paired_vs_gpt"].get(best) for s in seeds},
            "paired_vs_gpt_pooled": pooled_vs_gpt([out_dir / f"seed{s}" for s in seeds], dataset)}


def pooled_vs_gpt(bundle_dirs: list[Path], dataset: data.Dataset) -> dict:
    """Each fused row against the GPT over the bundles' mean: per user, NDCG@10 averaged over
    the bundles (seeds), then one paired 95 % interval over users."""
    results = [evaluate(d, dataset, rows=("gpt", *FUSED_ROWS), progress=False, keep_ranks=True)
               for d in bundle_dirs]
    return {name: pooled_paired_gain([(r["ranks"][name], r["ranks"]["gpt"]) for r in results])
            for name in FUSED_ROWS}
