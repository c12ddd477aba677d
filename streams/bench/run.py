"""`python -m streams bench`: runs the phases of `streams.bench.harness` (and the soak) and
prints and writes their table (never a timed test)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from streams.bench.harness import Bench, base_events, machine, stream_of
from streams.bundle import load_bundle
from streams.config import Settings
from streams.events import Event
from streams.local.endpoints import given_or_local
from streams.local.stack import LocalStack
from streams.tools.demo import ensure_bundle


def inference_bench(settings: Settings) -> dict:
    """GPT onnxruntime vs torch (model_export, run apart: streams never imports torch)."""
    cmd = [sys.executable, "-m", "model_export", "bench-inference", "--bundle", str(settings.bundle_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def refresh_bench(settings: Settings, redis_url: str, bundle, base: list[Event], users: int = 2000,
                  history_len: int = 200) -> dict:
    """The refresher's users per second (one onnxruntime thread) over histories this long."""
    from streams.longterm.refresher import LongTermRefresher
    from streams.longterm.store import DIRTY, hist_key, redis_client

    client = redis_client(redis_url, settings.redis_password, 10.0, asyncio_client=False)
    pipe = client.pipeline(transaction=False)
    for u in range(users):
        pipe.delete(hist_key(f"rb{u}"))
        pipe.rpush(hist_key(f"rb{u}"),
                   *[base[(u * 37 + j) % len(base)].item_id for j in range(history_len)])
        pipe.sadd(DIRTY, f"rb{u}")
    pipe.execute()
    started = time.perf_counter()
    n = LongTermRefresher(client, bundle).refresh_once()
    seconds = time.perf_counter() - started
    client.close()
    return {"users": n, "history_len": history_len, "refreshes_per_s": round(n / seconds, 1)}


def run_bench(settings: Settings, args) -> int:
    ensure_bundle(settings, quick=False)
    bundle = load_bundle(settings.bundle_dir)
    skip = set(filter(None, args.skip.split(",")))
    stack = LocalStack(settings.state_dir / f"bench-{uuid.uuid4().hex[:6]}")
    result = {"machine": machine(), "bundle": bundle.version,
              "settings": {"batch_size": settings.batch_size, "batch_within_s": settings.batch_within_s,
                           "partitions": settings.partitions}}
    try:
        bench = Bench(settings, *given_or_local(settings, stack), settings.state_dir / "logs")
        base = base_events(settings, bundle)
        events = stream_of(base, args.events)
        if "throughput" not in skip:
            print(f"throughput: {len(events)} events each through passthrough, pipeline without "
                  f"and with long-term vectors ({args.rounds} rounds), raw", flush=True)
            result["passthrough"], result["pipeline_short_term"], result["pipeline"] = \
                bench.throughput_rounds([("passthrough", False), ("worker", False), ("worker", True)],
                                        events, args.rounds)
            result["ratio"] = round(result["pipeline"]["events_per_s"] /
                                    result["passthrough"]["events_per_s"], 3)
            # the same ratio from the event loop's CPU per event (each agent's best round)
            result["loop_cpu_ratio"] = round(result["passthrough"]["loop_us_per_event"] /
                                             max(result["pipeline"]["loop_us_per_event"], 1e-9), 3)
            # what every user holding a long-term vector (added to per event) costs the loop
            result["long_term_loop_cost"] = round(
                result["pipeline"]["loop_us_per_event"] /
                max(result["pipeline_short_term"]["loop_us_per_event"], 1e-9) - 1.0, 3)
            result["broker_ceiling"] = bench.broker_ceiling(events)
            result["rss_mb"] = result["pipeline"]["rss_mb"]
        if "latency" not in skip:
            rates = [int(r) for r in args.rates.split(",")]
            print(f"latency: {rates} events/s, {args.duration:.0f} s each", flush=True)
            result["latency"] = bench.latency(stream_of(base, sum(rates) * int(args.duration) + 200),
                                              rates, args.duration)
            if "pipeline" in result:
                lat = result["latency"].get("1000") or next(iter(result["latency"].values()))
                result["pipeline"].update(p50_ms=lat["p50_ms"], p99_ms=lat["p99_ms"])
        if "exactly_once" not in skip:
            interval = settings.transaction_commit_ms
            print(f"exactly-once: {len(events)} events through the worker at least once, and "
                  f"exactly once with a transaction per batch and per {interval:g} ms "
                  f"({args.rounds} rounds, alternated); latency at 1000 events/s", flush=True)
            alo, per_batch, eos = bench.throughput_rounds(
                [("worker", True, "at_least_once"), ("worker", True, "exactly_once", 0.0),
                 ("worker", True, "exactly_once", interval)], events, args.rounds)
            paced = stream_of(base, 1000 * int(args.duration) + 200)
            result["exactly_once"] = {
                "transaction_commit_ms": interval,
                "at_least_once": alo, "exactly_once": eos, "exactly_once_per_batch": per_batch,
                "events_per_s_ratio": round(eos["events_per_s"] / alo["events_per_s"], 3),
                "per_batch_events_per_s_ratio": round(per_batch["events_per_s"]
                                                      / alo["events_per_s"], 3),
                "at_least_once_latency_1000": bench.latency(paced, [1000], args.duration)["1000"],
                "latency_1000": bench.latency(paced, [1000], args.duration,
                                              guarantee="exactly_once")["1000"],
                "per_batch_latency_1000": bench.latency(paced, [1000], args.duration,
                                                        guarantee="exactly_once",
                                                        commit_ms=0.0)["1000"]}
        if "swap" not in skip:
            print(f"swap: 1000 events/s, {args.duration:.0f} s without and with a bundle swap "
                  f"in the middle, alternated ({args.rounds} rounds, after a warm-up)", flush=True)
            result["swap"] = bench.swap_latency(
                stream_of(base, 2000 * args.rounds * int(args.duration) + 60_200), 1000,
                args.duration, args.rounds)
        if "inference" not in skip:
            print("inference: onnxruntime vs torch; long-term refresh", flush=True)
            result["inference"] = inference_bench(settings)
            result["inference"]["refresh"] = refresh_bench(settings, bench.redis, bundle, base)
        if args.soak:
            from streams.bench.soak import soak

            print(f"soak: {args.soak_rate:.0f} events/s for {args.soak:.0f} s", flush=True)
            out = Path(args.json).with_name("soak")
            r = soak(bench, base, args.soak_rate, args.soak, out.with_suffix(".json"), out.with_suffix(".png"))
            rss = [x["rss_mb"] for x in r["samples"]]
            lag = [x["lag"] or 0 for x in r["samples"]]
            result["soak"] = {"rate": args.soak_rate, "duration_s": args.soak, "samples": len(rss),
                              "rss_mb_first_last_max": [rss[0], rss[-1], max(rss)] if rss else None,
                              "lag_max": max(lag) if lag else None,
                              "p99_ms_per_10s_median_worst": [
                                  float(np.median([w["p99_ms"] for w in r["latency"]])),
                                  max(w["p99_ms"] for w in r["latency"])] if r["latency"] else None,
                              "plot": str(out.with_suffix(".png"))}
        if "state" not in skip and args.users:
            print(f"state: {args.users} users", flush=True)
            result["state"] = bench.state_size(base, args.users)
    finally:
        stack.stop(discard_data=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"written to {args.json}")
    return 0


def print_table(r: dict) -> None:
    rows = []
    if "pipeline" in r:
        def rounds(x: dict) -> str:
            return "/".join(f"{v:.0f}" for v in x.get("rounds_events_per_s", []))

        rows += [("pipeline events/s (best; rounds)",
                  f"{r['pipeline']['events_per_s']} ({rounds(r['pipeline'])})"),
                 ("pipeline without long-term vectors events/s (best; rounds)",
                  f"{r['pipeline_short_term']['events_per_s']} ({rounds(r['pipeline_short_term'])})"),
                 ("passthrough events/s (best; rounds)",
                  f"{r['passthrough']['events_per_s']} ({rounds(r['passthrough'])})"),
                 ("ratio pipeline/passthrough", r["ratio"]),
                 ("broker ceiling events/s", r["broker_ceiling"]["events_per_s"]),
                 ("pipeline CPU s / 1000 events", r["pipeline"]["cpu_s_per_1000"]),
                 ("event-loop thread cores, pipeline/passthrough",
                  f"{r['pipeline'].get('loop_cores')}/{r['passthrough'].get('loop_cores')}"),
                 ("event-loop CPU us/event, pipeline/passthrough (ratio)",
                  f"{r['pipeline'].get('loop_us_per_event')}/"
                  f"{r['passthrough'].get('loop_us_per_event')} ({r.get('loop_cpu_ratio')})"),
                 ("event-loop CPU us/event without long-term vectors; added by them",
                  f"{r['pipeline_short_term'].get('loop_us_per_event')}; "
                  f"{100 * r.get('long_term_loop_cost', 0):+.1f} %"),
                 ("pipeline peak RSS MB", r["pipeline"]["rss_mb"])]
    for rate, lat in r.get("latency", {}).items():
        if isinstance(lat, dict):
            rows.append((f"latency @{rate}/s p50/p95/p99/max ms",
                         f"{lat['p50_ms']}/{lat['p95_ms']}/{lat['p99_ms']}/{lat['max_ms']:.0f}"))
    if "exactly_once" in r:
        x = r["exactly_once"]

        def best(arm: dict) -> str:
            return (f"{arm['events_per_s']} ("
                    + "/".join(f"{v:.0f}" for v in arm["rounds_events_per_s"]) + ")")

        def latency(lat: dict) -> str:
            return f"{lat['p50_ms']}/{lat['p95_ms']}/{lat['p99_ms']}/{lat['max_ms']:.0f}"

        ms = f"{x['transaction_commit_ms']:g} ms"
        rows += [("at-least-once events/s (best; rounds)", best(x["at_least_once"])),
                 (f"exactly-once, transactions of {ms} / per batch: events/s",
                  f"{best(x['exactly_once'])}: {100 * (x['events_per_s_ratio'] - 1):+.1f} % / "
                  f"{best(x['exactly_once_per_batch'])}: "
                  f"{100 * (x['per_batch_events_per_s_ratio'] - 1):+.1f} %"),
                 (f"latency @1000/s p50/p95/p99/max ms, at-least-once / exactly-once {ms} / "
                  "per batch",
                  f"{latency(x['at_least_once_latency_1000'])} / {latency(x['latency_1000'])} / "
                  f"{latency(x['per_batch_latency_1000'])}"),
                 ("per batch @1000/s, means: events, Redis ms, inference ms, commit ms; "
                  "at-least-once / exactly-once / per batch",
                  " / ".join(", ".join(f"{v:g}" for v in x[name].get("worker_means", {}).values())
                             for name in ("at_least_once_latency_1000", "latency_1000",
                                          "per_batch_latency_1000")))]
    if "swap" in r:
        sw = r["swap"]
        rows.append((f"p99 ms @{sw['rate']}/s per round, steady / with a bundle swap",
                     " ".join(f"{a['p99_ms']:.0f}/{b['p99_ms']:.0f}"
                              for a, b in zip(sw["steady"], sw["swap"]))
                     + f" (median added: {sw['p99_added_ms']:+.1f})"))
    for key, value in r.get("inference", {}).items():
        if isinstance(value, dict):
            rows.append((f"inference {key}", ", ".join(f"{k}={v}" for k, v in value.items())))
    if "state" in r:
        rows.append((f"RSS with {r['state']['users']} users MB", r["state"]["rss_mb"]))
    width = max(len(k) for k, _ in rows) if rows else 10
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
