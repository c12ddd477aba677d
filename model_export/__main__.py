"""`python -m model_export build|evaluate` — a thin CLI over the library."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from streams.config import Settings
from streams.errors import InterestStreamError


def _dataset(args):
    from . import data

    if args.data == "synthetic":
        dataset = data.synthetic(seed=getattr(args, "seed", 0))
    else:
        dataset = data.load_any(args.data, getattr(args, "catalog", None))
    dataset = data.k_core(dataset, args.min_user_interactions, args.min_item_interactions)
    unused = data.never_chosen(dataset)
    if getattr(args, "items_in_log", False):
        dataset = data.items_in_log(dataset)
    elif unused:
        logging.getLogger(__name__).warning(
            "%s: %d of the catalog's %d items never occur in the log and are ranked all the "
            "same; --items-in-log ranks over the %d that do", dataset.name, unused,
            len(dataset.items), len(dataset.items) - unused)
    return dataset


def cmd_build(args) -> int:
    from .build import build
    from .evaluate import default_rows_for, print_table
    from .item_item import ItemItemConfig
    from .train import TrainConfig
    from .train_long_term import LongTermTrainConfig

    cfg = TrainConfig(seed=args.seed)
    long_train = LongTermTrainConfig(seed=args.seed)
    gpt = {}
    long_cfg = {"window": args.long_window, "n_layer": args.long_layers}
    item_cfg, rows = ItemItemConfig(), None
    if args.quick:
        cfg.epochs, cfg.fusion_epochs, cfg.gate_epochs = 4, 1, 4
        long_train.max_epochs, long_train.half_lives, long_train.use_text = 2, (1e9,), (True,)
        item_cfg = ItemItemConfig(l2_scales=(4.0,), half_lives=(15.0,))
        rows = tuple(r for r in default_rows_for(args.long_layers) if r != "bert_text")
    if args.epochs is not None:
        cfg.epochs = args.epochs
    cfg.refit = not (args.no_refit or args.quick)
    if args.half_life is not None:
        cfg.half_life = args.half_life
    started = time.time()
    manifest = build(_dataset(args), Path(args.out), gpt, cfg, fusion_mode=args.fusion_mode,
                     long_cfg=long_cfg, long_train=long_train, item_cfg=item_cfg,
                     evaluate_rows=rows)
    print(f"bundle {manifest['version']} -> {args.out} in {time.time() - started:.1f}s")
    items = manifest["items"]
    print(f"ranking over {items['ranked']} items"
          + (f", {items['never_in_log']} of them never in the log (--items-in-log leaves them out)"
             if items["never_in_log"] else ""))
    if manifest["metrics"]:
        print_table({"dataset": manifest["dataset"], "bundle": manifest["version"],
                     "n_users": manifest["metrics"]["gpt"]["n"], "models": manifest["metrics"],
                     "protocol": manifest.get("evaluation_protocol", {}),
                     "paired_vs_gpt": manifest.get("paired_vs_gpt", {})})
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import Protocol, evaluate, lag_table, plot, print_lag_table, print_table, save

    lag = args.long_term_lag if args.long_term_lag == "replay" else int(args.long_term_lag)
    protocol = Protocol(mask_history=args.mask_history, lag=lag, update=not args.no_update,
                        refresh_s=args.refresh_s, seed=args.seed,
                        text_profile_users=args.text_profile_users)
    dataset = _dataset(args)
    result = evaluate(args.bundle, dataset, fixed_alpha=args.alpha, protocol=protocol)
    print_table(result)
    if args.lags:
        print()
        result["lags"] = lag_table(args.bundle, dataset, args.refresh_s, args.seed,
                                   args.mask_history)
        print_lag_table(result["lags"])
    if args.json:
        save(result, Path(args.json))
    if args.plot:
        plot(result, Path(args.plot))
    return 0


def cmd_bench_inference(args) -> int:
    import json

    from .bench_inference import bench_inference

    print(json.dumps(bench_inference(args.bundle)))
    return 0


def cmd_scaling(args) -> int:
    from .scaling import scaling

    scaling(args.scales, Path(args.out), Path(args.json),
            Path(args.plot) if args.plot else None, args.full, args.epochs)
    print(f"results in {args.json}" + (f", plot in {args.plot}" if args.plot else ""))
    return 0


def cmd_quality(args) -> int:
    import json

    from .quality import quality

    dataset = _dataset(args)
    out = Path(args.out or f"artifacts/quality-{dataset.name}")
    result = quality(dataset, args.seeds, out, rebuild=not args.reuse,
                     long_cfg={"n_layer": args.long_layers})
    path = Path(args.json or f"{out}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"bundles in {out}/, results in {path}")
    for name, m in result["ndcg@10"].items():
        print(f"{name:<18} NDCG@10 {m['mean']:.4f} ± {m['std']:.4f}")
    print(f"best fused: {result['best_fused']} ({result['best_fused_gain_vs_gpt']:+.1%} vs gpt)")
    for name, p in result["paired_vs_gpt_pooled"].items():
        print(f"{name} vs gpt, per user over the seeds' mean: {p['gain']:+.1%} "
              f"(95% CI {p['ci95'][0]:+.1%} .. {p['ci95'][1]:+.1%})")
    return 0


def main(argv=None) -> int:
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "10")  # progress bars in logs: a line per 10 s
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="python -m model_export",
                                     description="Train, export and evaluate interest-stream models.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the models and write an ONNX bundle")
    b.add_argument("--data", default=str(settings.data_dir),
                   help="MovieLens folder, a CSV/JSONL log, or 'synthetic' (default: DATA_DIR)")
    b.add_argument("--catalog", help="item catalog (CSV/JSONL item_id,text) for a generic log")
    b.add_argument("--out", default=str(settings.bundle_dir))
    b.add_argument("--epochs", type=int)
    b.add_argument("--quick", action="store_true",
                   help="a bundle in under a minute: a few epochs, one item-item setting, no "
                        "refit on train+validation, and the build's evaluation without the "
                        "text-profile row (bert_text)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-refit", action="store_true",
                   help="serve the models the choices were made with (trained without each "
                        "user's validation item and tail) instead of refitting on all known")
    b.add_argument("--half-life", type=float,
                   help="recency half-life (in items) of the text baseline `bert` (default 1000)")
    b.add_argument("--fusion-mode", default="fixed", choices=("fixed", "attention", "gate"),
                   help="the mode served when FUSION_MODE is unset (fixed: best in `make quality`)")
    b.add_argument("--long-window", type=int, default=200,
                   help="newest items the long-term model reads (default 200)")
    b.add_argument("--long-layers", type=int, default=0,
                   help="transformer layers of the long-term model: 0 = the pooled tower, whose "
                        "vector the worker updates per event; 2 = a BERT over the history")
    b.set_defaults(func=cmd_build)
    e = sub.add_parser("evaluate", help="offline metrics of a bundle on the leave-one-out test split")
    e.add_argument("--bundle", default=str(settings.bundle_dir))
    e.add_argument("--data", default=str(settings.data_dir))
    e.add_argument("--catalog")
    e.add_argument("--json")
    e.add_argument("--plot")
    e.add_argument("--alpha", type=float, help="short-term weight of fused_fixed")
    e.add_argument("--long-term-lag", default="0",
                   help="events the long-term input misses: N, or 'replay' (the log's own "
                        "events in the last --refresh-s seconds)")
    e.add_argument("--no-update", action="store_true",
                   help="serve the lagged vector as refreshed, without the worker's update")
    e.add_argument("--refresh-s", type=float, default=settings.long_term_refresh_s)
    e.add_argument("--lags", action="store_true",
                   help="also the fused model against the GPT with the long-term input as "
                        "stale as a refresh leaves it, with and without the per-event update")
    e.add_argument("--mask-history", default="all",
                   help="items excluded from the ranking: all (default) or window:N")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--text-profile-users", type=int, default=2000,
                   help="score the bert_text row (a BERT pass per user) for a seeded sample "
                        "of this many users when there are more (default 2000)")
    e.set_defaults(func=cmd_evaluate)
    bi = sub.add_parser("bench-inference", help="GPT per event: onnxruntime vs torch")
    bi.add_argument("--bundle", default=str(settings.bundle_dir))
    bi.set_defaults(func=cmd_bench_inference)
    sc = sub.add_parser("scaling", help="build and evaluate time and peak RSS on the synthetic "
                                        "stream at multiples of ml-100k's users and items")
    sc.add_argument("--scales", nargs="+", default=["1x1", "10x10"],
                    help="USERSxITEMS multiples of ml-100k (default: 1x1 10x10)")
    sc.add_argument("--full", action="store_true", help="full builds (default: --quick's epochs)")
    sc.add_argument("--epochs", type=int, help="the GPT's epochs in each build")
    sc.add_argument("--out", default="artifacts/scaling", help="logs, bundles and results")
    sc.add_argument("--json", default="artifacts/scaling.json")
    sc.add_argument("--plot", default="artifacts/scaling.png")
    sc.set_defaults(func=cmd_scaling)
    q = sub.add_parser("quality", help="full builds over several seeds: NDCG@10 mean and spread")
    q.add_argument("--data", default=str(settings.data_dir),
                   help="MovieLens folder, a CSV/JSONL log, or 'synthetic' (default: DATA_DIR)")
    q.add_argument("--catalog", help="item catalog (CSV/JSONL item_id,text) for a generic log")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--out", help="bundles go here (default: artifacts/quality-DATASET)")
    q.add_argument("--reuse", action="store_true",
                   help="re-read the bundles already in --out instead of building them")
    q.add_argument("--json", help="results (default: the --out folder's name + .json)")
    q.add_argument("--long-layers", type=int, default=0,
                   help="the long-term model's encoder layers (0: pooled; 2: a BERT)")
    q.set_defaults(func=cmd_quality)
    for p in (b, q):
        p.add_argument("--items-in-log", action="store_true",
                       help="rank over the items that occur in the log, not the whole catalog")
    for p in (b, e, q):
        p.add_argument("--min-user-interactions", type=int, default=0,
                       help="k-core: drop users with fewer interactions (iteratively)")
        p.add_argument("--min-item-interactions", type=int, default=0,
                       help="k-core: drop items with fewer interactions (iteratively)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InterestStreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
