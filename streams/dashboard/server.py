"""aiohttp server: `/` the page, `/stream` server-sent snapshots, `/api/snapshot` JSON.

A background thread consumes `recommendations` and `events.dlq` (from their end) and folds
every record into `DashboardState`. Binds 127.0.0.1 unless told otherwise; bound elsewhere it
requires DASHBOARD_TOKEN (as ?token= or an `Authorization: Bearer` header).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import orjson
from aiohttp import web

from ..config import Settings
from ..errors import ConfigError
from ..online import PrequentialEvaluator

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)}


class DashboardState:
    """Everything the page shows, folded from the two topics. Thread-safe."""

    def __init__(self, window: int = 5000, latest: int = 15):
        self.lock = threading.Lock()
        self.total = 0
        self.arrivals: deque[float] = deque(maxlen=window)
        self.emit_latency: deque[float] = deque(maxlen=window)
        self.seen_latency: deque[float] = deque(maxlen=window)
        self.alphas: deque[float] = deque(maxlen=window)
        self.lt_ages: deque[float] = deque(maxlen=window)
        self.lt_missing: deque[bool] = deque(maxlen=window)
        self.latest: deque[dict] = deque(maxlen=latest)
        self.dlq: Counter = Counter()
        self.online = PrequentialEvaluator(k=10)
        self.modes: Counter = Counter()

    def on_recommendation(self, rec: dict, now_ms: int | None = None) -> None:
        now_ms = now_ms or int(time.time() * 1000)
        with self.lock:
            self.total += 1
            self.arrivals.append(now_ms / 1000.0)
            self.emit_latency.append(rec["emitted_ts"] - rec["event_ts"])
            self.seen_latency.append(now_ms - rec["event_ts"])
            self.alphas.append(rec["alpha"])
            self.modes[rec.get("fusion_mode")] += 1
            lt = rec.get("long_term")
            self.lt_missing.append(lt is None)
            if lt is not None:
                self.lt_ages.append(lt["age_s"])
            self.online.update(rec)
            self.latest.appendleft({
                "user_id": rec["user_id"], "item_id": rec.get("item_id"),
                "items": [i.get("title") or i["item_id"] for i in rec["items"][:5]],
                "alpha": rec["alpha"], "long_term": lt, "degraded": rec.get("degraded", False),
                "latency_ms": rec["emitted_ts"] - rec["event_ts"]})

    def on_dlq(self, rec: dict) -> None:
        with self.lock:
            self.dlq[rec.get("reason", "unknown")] += 1

    def snapshot(self, now: float | None = None) -> dict:
        now = now or time.time()
        with self.lock:
            recent = [t for t in self.arrivals if t >= now - 10.0]
            hist, _ = np.histogram(list(self.alphas), bins=10, range=(0.0, 1.0))
            return {
                "updated": now,
                "total": self.total,
                "events_per_s": round(len(recent) / 10.0, 1),
                "latency_ms": {"emitted": percentiles(self.emit_latency),
                               "seen": percentiles(self.seen_latency)},
                "alpha_hist": hist.tolist(),
                "alpha_mean": round(float(np.mean(self.alphas)), 3) if self.alphas else None,
                "fusion_modes": dict(self.modes),
                "long_term": {"share_missing": round(float(np.mean(self.lt_missing)), 3)
                              if self.lt_missing else None, "age_s": percentiles(self.lt_ages)},
                "dlq": dict(self.dlq),
                "online": self.online.summary(),
                "latest": list(self.latest),
            }


def tail_both_topics(settings: Settings, bootstrap: str):
    """A consumer of `recommendations` and `events.dlq` from their current ends, positions
    fixed before the page is served: a record written once the dashboard is up is never
    missed (auto.offset.reset=latest looks the position up after a group join, and skipped
    what was written in between)."""
    from ..kafka_clients import ensure_topics, tail_consumer

    ensure_topics(settings, bootstrap)
    return tail_consumer(settings, bootstrap, [settings.topic_recommendations, settings.topic_dlq])


def consume_forever(cons, settings: Settings, state: DashboardState,
                    stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            msg = cons.poll(0.2)
            if msg is None or msg.error():
                continue
            try:
                rec = orjson.loads(msg.value())
                if msg.topic() == settings.topic_dlq:
                    state.on_dlq(rec)
                else:
                    state.on_recommendation(rec)
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable record on %s: %s", msg.topic(), exc)
    finally:
        cons.close()


def check_binding(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise ConfigError(f"DASHBOARD_HOST={host} is not loopback: set DASHBOARD_TOKEN to protect it")


def create_app(state: DashboardState, token: str | None = None, interval_s: float = 1.0) -> web.Application:
    @web.middleware
    async def auth(request, handler):
        if token:
            given = request.query.get("token") or request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.Response(status=401, text="token required (?token=... or Authorization: Bearer)")
        return await handler(request)

    async def index(request):
        return web.FileResponse(STATIC / "index.html")

    async def snapshot(request):
        return web.json_response(state.snapshot(), dumps=lambda o: orjson.dumps(o).decode())

    async def stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: " + orjson.dumps(state.snapshot()) + b"\n\n")
                await asyncio.sleep(interval_s)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    app = web.Application(middlewares=[auth])
    app.router.add_get("/", index)
    app.router.add_get("/stream", stream)
    app.router.add_get("/api/snapshot", snapshot)
    return app


def run(settings: Settings, bootstrap: str) -> None:
    check_binding(settings.dashboard_host, settings.dashboard_token)
    state, stop = DashboardState(), threading.Event()
    cons = tail_both_topics(settings, bootstrap)
    thread = threading.Thread(target=consume_forever, args=(cons, settings, state, stop),
                              daemon=True)
    thread.start()
    print(f"dashboard on http://{settings.dashboard_host}:{settings.dashboard_port}/", flush=True)
    try:
        web.run_app(create_app(state, settings.dashboard_token), host=settings.dashboard_host,
                    port=settings.dashboard_port, print=None, access_log=None)
    finally:
        stop.set()
        thread.join(5)
