"""The periodic long-term refresh: dirty users' long history -> the long-term model -> Redis.

With an incremental model each vector is written with the weighted mean it came from and the
history place it covers, so the worker can add the events that arrive after it.

Given the bundle location, the refresher switches to a bundle published there (checked first;
a broken one is refused and the loaded one kept) and queues every user whose vector another
bundle wrote, so that the next passes re-encode them for the new one. With A/B arms each user
is encoded by their arm's bundle (`streams.arms`), each arm's location watched on its own."""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streams import metrics
from streams.arms import Arm, arm_of
from streams.bundle import Bundle, load_bundle
from streams.bundle_watch import BundleWatcher, loaded_ref
from streams.errors import BundleError
from streams.inference import LongTermEncoder
from streams.longterm.store import queue_reencoding, read_histories_at, take_dirty, write_vectors

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One arm's (or the only) bundle, its encoder, and the watcher of its location."""

    bundle: Bundle
    encoder: LongTermEncoder
    watcher: BundleWatcher | None  # None: serve `bundle` until stopped


class LongTermRefresher:
    def __init__(self, client, bundle: Bundle, chunk: int = 256, construction: str | None = None,
                 location: str | Path | None = None, arms: tuple[Arm, ...] = (),
                 salt: str = ""):
        """One bundle for everyone (`bundle`, watched at `location`), or with `arms` one per
        arm, loaded from each arm's directory (`bundle` is then the first arm's)."""
        self.client = client
        self.construction = construction
        self.chunk = chunk
        self.arms, self.salt = arms, salt
        places = [("", bundle, location)] if not arms else \
            [(a.name, bundle if i == 0 else load_bundle(a.bundle_dir), a.bundle_dir)
             for i, a in enumerate(arms)]
        self.variants = {name: Variant(b, self._encoder(b), None if where is None else
                                       BundleWatcher(where, loaded_ref(b.path, b.version)))
                         for name, b, where in places}
        self.wake = threading.Event()  # SIGHUP: look at the locations now

    @property
    def bundle(self) -> Bundle:
        return next(iter(self.variants.values())).bundle

    def variant_of(self, user: str) -> Variant:
        if not self.arms:
            return next(iter(self.variants.values()))
        return self.variants[arm_of(user, self.arms, self.salt).name]

    def _encoder(self, bundle: Bundle) -> LongTermEncoder:
        text = (self.construction or "") == "text" or \
            bundle.manifest.get("long_term", {}).get("construction") == "text"
        return LongTermEncoder(bundle, threads=1, with_text_encoder=text)

    def switch_to_published(self) -> bool:
        """Load each bundle published at a location, if it is new, and serve it once it has
        encoded a warm-up history; queue the users whose vector is not their bundle's."""
        switched = False
        for variant in self.variants.values():
            switched = self._switch(variant) or switched
        if switched:
            queued = queue_reencoding(self.client,
                                      lambda user: self.variant_of(user).bundle.version)
            log.info("%d users queued for re-encoding", queued)
        return switched

    def _switch(self, variant: Variant) -> bool:
        ref = variant.watcher.candidate() if variant.watcher is not None else None
        if ref is None:
            return False
        try:
            bundle = load_bundle(ref.path)
            encoder = self._encoder(bundle)
            if not np.all(np.isfinite(self._vectors(encoder, [[1]], [[1.0]])[0])):
                raise BundleError("the long-term model gives non-finite vectors")
        except Exception as exc:
            variant.watcher.refuse(ref, f"{type(exc).__name__}: {exc}")
            return False
        variant.bundle, variant.encoder = bundle, encoder
        variant.watcher.accept(ref)
        return True

    def refresh_once(self) -> int:
        """Recompute every user marked dirty; returns how many vectors were written."""
        started, total = time.perf_counter(), 0
        while True:
            users = take_dirty(self.client, self.chunk)
            if not users:
                break
            try:
                histories, places = read_histories_at(self.client, users)
                by_variant: dict[int, tuple[Variant, list[int]]] = {}
                for i, user in enumerate(users):
                    v = self.variant_of(user)
                    by_variant.setdefault(id(v), (v, []))[1].append(i)
                for variant, at in by_variant.values():
                    row_of = variant.bundle.items.row_of
                    known = {i: [(row_of[it], w) for it, w in histories[i] if it in row_of]
                             for i in at}
                    keep = [i for i in at if known[i]]
                    if keep:
                        self.write(variant, [users[i] for i in keep], [known[i] for i in keep],
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

    def write(self, variant: Variant, users: list[str], known: list[list[tuple[int, float]]],
              places: list[tuple[str, int] | None]) -> None:
        rows = [[r for r, _ in h] for h in known]
        weights = [[w for _, w in h] for h in known]
        vectors, pooled, total = self._vectors(variant.encoder, rows, weights)
        write_vectors(self.client, users, vectors, variant.bundle.version,
                      int(time.time() * 1000), pooled, total,
                      places if pooled is not None else None)

    def _vectors(self, encoder: LongTermEncoder, rows, weights):
        """(h_l, pooled means, their weights) of the histories; the last two None unless the
        model is served incrementally."""
        if self.construction in (None, "model") and encoder.construction == "model":
            parts = encoder.model_parts(rows, weights)
            return parts.h_l, parts.pooled, parts.weight
        return encoder.encode(rows, self.construction, event_weights=weights), None, None

    def run_forever(self, interval_s: float, stop: threading.Event | None = None,
                    watch_s: float = 0.0) -> None:
        """Refresh every `interval_s`; look at the bundle location every `watch_s` (0: only on
        SIGHUP) and between passes."""
        stop = stop or threading.Event()

        def stopping(*_):
            stop.set()
            self.wake.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stopping)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: self.wake.set())
        next_refresh = 0.0
        while not stop.is_set():
            if self.switch_to_published_quietly():
                next_refresh = 0.0  # re-encode for the new bundle now, not a period later
            if time.monotonic() >= next_refresh:
                try:
                    self.refresh_once()
                except Exception as exc:  # Redis down: keep trying, never exit
                    log.warning("refresh failed (%s: %s); retrying in %.1fs", type(exc).__name__,
                                exc, interval_s)
                next_refresh = time.monotonic() + interval_s
            wait = next_refresh - time.monotonic()
            self.wake.wait(max(0.0, min(wait, watch_s) if watch_s > 0 else wait))
            self.wake.clear()

    def switch_to_published_quietly(self) -> bool:
        try:
            return self.switch_to_published()
        except Exception as exc:  # Redis down while queueing: the next look tries again
            log.warning("bundle switch failed (%s: %s)", type(exc).__name__, exc)
            return False
