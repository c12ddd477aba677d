"""The soak benchmark (not a test): a steady rate for a long time; worker RSS and consumer lag
sampled every 10 s, end-to-end latency per 10 s of input, written as JSON and plotted. All must
stay flat."""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path

from streams.bench.harness import Bench, proc_usage, worker_metrics
from streams.kafka.clients import ensure_topics, producer


def lag_from_metrics(port: int) -> float | None:
    try:
        return worker_metrics(port).get("consumer_lag")
    except OSError:
        return None


def soak(bench: Bench, events, rate: float, duration_s: float, out_json: Path, out_png: Path) -> dict:
    s = bench.fresh()
    ensure_topics(s, bench.kafka)
    env = bench.env(s)
    proc = bench.children.start(f"soak-{s.app_id}", ["worker"], env)
    port = int(env["WEB_PORT"])
    n = int(rate * duration_s)
    stream = (events[i % len(events)] for i in range(n))
    samples, stop = [], threading.Event()

    def sample():
        started = time.monotonic()
        while not stop.wait(10.0):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS")) / 1024
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss, 1),
                            "lag": lag_from_metrics(port), "cpu_s": proc_usage(proc.pid)["cpu_s"]})

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        time.sleep(8)  # worker start
        sampler.start()
        sent = _unique(stream, n)
        prod = producer(s, bench.kafka, **{"linger.ms": 0})
        sender = threading.Thread(target=bench._paced_send, args=(prod, s, sent, rate), daemon=True)
        sender.start()
        out = bench.drain(s, sent, proc, timeout_s=300)
        sender.join()
    finally:
        stop.set()
        bench.children.stop()
        bench.children.procs.clear()
    result = {"rate": rate, "duration_s": duration_s, "events": n, "samples": samples,
              "latency": latency_windows(out)}
    out_json.write_text(json.dumps(result, indent=2))
    plot(samples, result["latency"], out_png, rate)
    return result


def _unique(stream, n):
    from streams.events import Event

    return [Event(f"soak-{i}-{e.event_id}", e.user_id, e.item_id, e.event_type, e.ts)
            for i, e in zip(range(n), stream)]


def latency_windows(out, window_s: float = 10.0) -> list[dict]:
    """End-to-end latency percentiles per `window_s` of input (by the events' ts)."""
    import numpy as np

    if not out:
        return []
    start = min(event_ts for _, event_ts, _ in out)
    windows = defaultdict(list)
    for _, event_ts, arrival in out:
        windows[int((event_ts - start) / 1000 / window_s)].append(arrival - event_ts)
    return [{"t_s": k * window_s, "events": len(v),
             **{f"p{q}_ms": round(float(np.percentile(v, q)), 1) for q in (50, 99)},
             "max_ms": float(max(v))} for k, v in sorted(windows.items())]


def plot(samples, latency, path: Path, rate: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    a.plot(t, [s["rss_mb"] for s in samples], color="#4477aa")
    a.set_ylabel("worker RSS (MB)")
    a.set_ylim(bottom=0)
    b.plot(t, [s["lag"] or 0 for s in samples], color="#cc6677")
    b.set_ylabel("consumer lag (events)")
    tl = [w["t_s"] / 60 for w in latency]
    c.plot(tl, [w["p50_ms"] for w in latency], label="p50", color="#228833")
    c.plot(tl, [w["p99_ms"] for w in latency], label="p99", color="#ccbb44")
    c.set_ylabel("event -> output (ms)")
    c.set_ylim(bottom=0)
    c.legend(loc="upper right")
    c.set_xlabel("minutes")
    fig.suptitle(f"soak at {rate:.0f} events/s")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
