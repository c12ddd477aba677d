"""The quality benchmark (not a test): full ml-100k builds over several seeds, mean and spread.

`python -m model_export quality --seeds 0 1 2 --json artifacts/quality.json`
"""
from __future__ import annotations

import statistics
from pathlib import Path

from . import data
from .build import build
from .train import TrainConfig


def quality(dataset: data.Dataset, seeds: list[int], out_dir: Path) -> dict:
    runs = {}
    for seed in seeds:
        manifest = build(dataset, out_dir / f"seed{seed}", train_cfg=TrainConfig(seed=seed, progress=False))
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
            "best_fused_paired_by_seed": {s: runs[s]["paired_vs_gpt"].get(best) for s in seeds}}
