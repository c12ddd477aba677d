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

from streams.config import Settings
from streams.errors import ConfigError
from streams.tools.online import PrequentialEvaluator, arm_report

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)}


RECENT_S = 60.0  # latency percentiles cover the recommendations that arrived this recently
LATE_MS = 60_000  # an event older than this when its recommendation arrives counts as late
BUCKET_S = 5  # the time series' step
HISTORY_S = 15 * 60  # and their span


class Bucket:
    """What arrived in one BUCKET_S step."""

    __slots__ = ("start", "count", "latencies", "alpha_sum", "hits", "scored", "lag")

    def __init__(self, start: int):
        self.start, self.count, self.latencies = start, 0, []
        self.alpha_sum, self.hits, self.scored, self.lag = 0.0, 0, 0, None

    def point(self) -> dict:
        lat = percentiles(self.latencies)
        return {"t": self.start, "per_s": round(self.count / BUCKET_S, 2), "p50": lat["p50"],
                "p99": lat["p99"], "alpha": round(self.alpha_sum / self.count, 3)
                if self.count else None, "hr": round(self.hits / self.scored, 3)
                if self.scored else None, "lag": self.lag}


class DashboardState:
    """Everything the page shows, folded from the two topics. Thread-safe.

    Latency percentiles are over the last RECENT_S seconds of arrivals (a restart that replays
    old events would otherwise hold them up for as long as the process lives); such old
    events are counted as late instead. The time series keep BUCKET_S steps over HISTORY_S."""

    def __init__(self, window: int = 5000, latest: int = 15, titles: dict | None = None):
        self.lock = threading.Lock()
        self.total = 0
        self.late = 0
        self.recent: deque[tuple[float, float, float]] = deque()  # (arrival s, emitted, seen ms)
        self.arrivals: deque[float] = deque(maxlen=window)
        self.alphas: deque[float] = deque(maxlen=window)
        self.lt_ages: deque[float] = deque(maxlen=window)
        self.lt_missing: deque[bool] = deque(maxlen=window)
        self.latest: deque[dict] = deque(maxlen=latest)
        self.dlq: Counter = Counter()
        self.online = PrequentialEvaluator(k=10)
        self.arm_ranks: deque[tuple[str, str, int]] = deque(maxlen=window * 10)  # with A/B arms
        self.modes: Counter = Counter()
        self.buckets: deque[Bucket] = deque(maxlen=HISTORY_S // BUCKET_S)
        self.titles: dict = dict(titles or {})  # item_id -> title (the bundle's, and seen ones)
        self.lag: int | None = None

    def _bucket(self, now_s: float) -> Bucket:
        start = int(now_s // BUCKET_S * BUCKET_S)
        if not self.buckets or self.buckets[-1].start < start:
            self.buckets.append(Bucket(start))
        return self.buckets[-1]

    def on_recommendation(self, rec: dict, now_ms: int | None = None) -> None:
        now_ms = now_ms or int(time.time() * 1000)
        with self.lock:
            self.total += 1
            seen = now_ms - rec["event_ts"]
            self.late += seen > LATE_MS
            self.recent.append((now_ms / 1000.0, rec["emitted_ts"] - rec["event_ts"], seen))
            self.arrivals.append(now_ms / 1000.0)
            self.alphas.append(rec["alpha"])
            self.modes[rec.get("fusion_mode")] += 1
            lt = rec.get("long_term")
            self.lt_missing.append(lt is None)
            if lt is not None:
                self.lt_ages.append(lt["age_s"])
            rank = self.online.update(rec)
            bucket = self._bucket(now_ms / 1000.0)
            bucket.count += 1
            bucket.latencies.append(seen)
            bucket.alpha_sum += rec["alpha"]
            if rank is not None:
                bucket.scored += 1
                bucket.hits += rank <= self.online.k
                if rec.get("arm"):
                    self.arm_ranks.append((rec["arm"], rec["user_id"], rank))
            for item in rec["items"]:
                if item.get("title"):
                    self.titles.setdefault(item["item_id"], item["title"])
            after = rec.get("item_id")
            self.latest.appendleft({
                "user_id": rec["user_id"], "item_id": after,
                "item_title": self.titles.get(after),
                "items": [i.get("title") or i["item_id"] for i in rec["items"][:5]],
                "alpha": rec["alpha"], "long_term": lt, "degraded": rec.get("degraded", False),
                "latency_ms": rec["emitted_ts"] - rec["event_ts"]})

    def on_dlq(self, rec: dict) -> None:
        with self.lock:
            self.dlq[rec.get("reason", "unknown")] += 1

    def on_lag(self, lag: int | None, now: float | None = None) -> None:
        with self.lock:
            self.lag = lag
            self._bucket(now or time.time()).lag = lag

    def snapshot(self, now: float | None = None) -> dict:
        now = now or time.time()
        with self.lock:
            while self.recent and self.recent[0][0] < now - RECENT_S:
                self.recent.popleft()
            rates = [t for t in self.arrivals if t >= now - 10.0]
            hist, _ = np.histogram(list(self.alphas), bins=10, range=(0.0, 1.0))
            return {
                "updated": now,
                "total": self.total,
                "late": self.late,
                "events_per_s": round(len(rates) / 10.0, 1),
                "latency_window_s": RECENT_S,
                "latency_ms": {"emitted": percentiles([r[1] for r in self.recent]),
                               "seen": percentiles([r[2] for r in self.recent])},
                "alpha_hist": hist.tolist(),
                "alpha_mean": round(float(np.mean(self.alphas)), 3) if self.alphas else None,
                "fusion_modes": dict(self.modes),
                "long_term": {"share_missing": round(float(np.mean(self.lt_missing)), 3)
                              if self.lt_missing else None, "age_s": percentiles(self.lt_ages)},
                "dlq": dict(self.dlq),
                "online": self.online.summary(),
                # per A/B arm over the last scored events, each against the first arm seen
                "arms": arm_report(list(self.arm_ranks), self.online.k),
                "consumer_lag": self.lag,
                "series": [b.point() for b in self.buckets if b.start >= now - HISTORY_S],
                "latest": list(self.latest),
            }


def tail_both_topics(settings: Settings, bootstrap: str):
    """A consumer of `recommendations` and `events.dlq` from their current ends, positions
    fixed before the page is served: a record written once the dashboard is up is never
    missed (auto.offset.reset=latest looks the position up after a group join, and skipped
    what was written in between)."""
    from streams.kafka.clients import ensure_topics, tail_consumer

    ensure_topics(settings, bootstrap)
    return tail_consumer(settings, bootstrap, [settings.topic_recommendations, settings.topic_dlq])


def worker_lag(settings: Settings, bootstrap: str) -> int | None:
    """Records of `events` not yet committed by the worker's group (APP_ID), summed."""
    from confluent_kafka import TopicPartition

    from streams.kafka.clients import consumer

    cons = consumer(settings, bootstrap, settings.app_id)  # reads offsets only: never joins
    try:
        meta = cons.list_topics(settings.topic_events, timeout=5).topics[settings.topic_events]
        tps = [TopicPartition(settings.topic_events, p) for p in meta.partitions]
        total = 0
        for tp in cons.committed(tps, timeout=5):
            low, high = cons.get_watermark_offsets(tp, timeout=5)
            total += high - (tp.offset if tp.offset >= 0 else low)
        return total
    except Exception:  # broker away, topic gone: unknown, not zero
        return None
    finally:
        cons.close()


def sample_lag_forever(settings: Settings, bootstrap: str, state: DashboardState,
                       stop: threading.Event, interval_s: float = 5.0) -> None:
    while not stop.is_set():
        state.on_lag(worker_lag(settings, bootstrap))
        stop.wait(interval_s)


def catalog_titles(settings: Settings) -> dict:
    """item_id -> title from the bundle, when there is one (else titles are learned from the
    recommendations' items as they come)."""
    try:
        records = orjson.loads((Path(settings.bundle_dir) / "items.json").read_bytes())
        return {r["item_id"]: r["title"] for r in records if r.get("title")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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
    state, stop = DashboardState(titles=catalog_titles(settings)), threading.Event()
    cons = tail_both_topics(settings, bootstrap)
    thread = threading.Thread(target=consume_forever, args=(cons, settings, state, stop),
                              daemon=True)
    thread.start()
    threading.Thread(target=sample_lag_forever, args=(settings, bootstrap, state, stop),
                     daemon=True).start()
    print(f"dashboard on http://{settings.dashboard_host}:{settings.dashboard_port}/", flush=True)
    try:
        web.run_app(create_app(state, settings.dashboard_token), host=settings.dashboard_host,
                    port=settings.dashboard_port, print=None, access_log=None)
    finally:
        stop.set()
        thread.join(5)
