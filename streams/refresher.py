"""The periodic long-term refresh: dirty users' long history -> BERT -> projected vector -> Redis."""
from __future__ import annotations

import logging
import signal
import threading
import time

from . import metrics
from .bundle import Bundle
from .inference import LongTermEncoder
from .longterm import read_histories, take_dirty, write_vectors

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
                histories = read_histories(self.client, users)
                known = [[(row_of[i], w) for i, w in h if i in row_of] for h in histories]
                keep = [i for i, h in enumerate(known) if h]
                if keep:
                    vectors = self.encoder.encode(
                        [[r for r, _ in known[i]] for i in keep], self.construction,
                        event_weights=[[w for _, w in known[i]] for i in keep])
                    write_vectors(self.client, [users[i] for i in keep], vectors,
                                  self.bundle.version, int(time.time() * 1000))
                total += len(keep)
            except Exception:
                self.client.sadd("is:dirty", *users)  # put them back for the next pass
                raise
        metrics.REFRESHES.inc(total)
        metrics.REFRESH_SECONDS.observe(time.perf_counter() - started)
        if total:
            log.info("refreshed %d long-term vectors in %.2fs", total, time.perf_counter() - started)
        return total

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
