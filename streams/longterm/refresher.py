"""The periodic long-term refresh: dirty users' long history -> the long-term model -> Redis.

With an incremental model each vector is written with the weighted mean it came from and the
history place it covers, so the worker can add the events that arrive after it."""
from __future__ import annotations

import logging
import signal
import threading
import time

from streams import metrics
from streams.bundle import Bundle
from streams.inference import LongTermEncoder
from streams.longterm.store import read_histories_at, take_dirty, write_vectors

log = logging.getLogger(__name__)


class LongTermRefresher:
    def __init__(self, client, bundle: Bundle, chunk: int = 256, construction: str | None = None):
        self.client = client
        self.bundle = bundle
        self.encoder = LongTermEncoder(bundle, threads=1,
                                       with_text_encoder=(construction or "") == "text" or
                                       bundle.manifest.get("long_term", {}).get("construction") == "text")
        self.construction = construction
        self.chunk = chunk

    def refresh_once(self) -> int:
        """Recompute every user marked dirty; returns how many vectors were written."""
        started, total = time.perf_counter(), 0
        row_of = self.bundle.items.row_of
        while True:
            users = take_dirty(self.client, self.chunk)
            if not users:
                break
            try:
                histories, places = read_histories_at(self.client, users)
                known = [[(row_of[i], w) for i, w in h if i in row_of] for h in histories]
                keep = [i for i, h in enumerate(known) if h]
                if keep:
                    self.write([users[i] for i in keep], [known[i] for i in keep],
                               [places[i] for i in keep])
                total += len(keep)
            except Exception:
                self.client.sadd("is:dirty", *users)  # put them back for the next pass
                raise
        metrics.REFRESHES.inc(total)
        metrics.REFRESH_SECONDS.observe(time.perf_counter() - started)
        if total:
            log.info("refreshed %d long-term vectors in %.2fs", total, time.perf_counter() - started)
        return total

    def write(self, users: list[str], known: list[list[tuple[int, float]]],
              places: list[tuple[str, int] | None]) -> None:
        rows = [[r for r, _ in h] for h in known]
        weights = [[w for _, w in h] for h in known]
        now_ms = int(time.time() * 1000)
        if self.construction in (None, "model") and self.encoder.construction == "model":
            parts = self.encoder.model_parts(rows, weights)
            write_vectors(self.client, users, parts.h_l, self.bundle.version, now_ms,
                          parts.pooled, parts.weight, places)
        else:
            vectors = self.encoder.encode(rows, self.construction, event_weights=weights)
            write_vectors(self.client, users, vectors, self.bundle.version, now_ms)

    def run_forever(self, interval_s: float, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            try:
                self.refresh_once()
            except Exception as exc:  # Redis down: keep trying, never exit
                log.warning("refresh failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc,
                            interval_s)
            stop.wait(interval_s)
