"""The worker's bundle swap: a newly published bundle is loaded and checked beside the running
one, in a thread of its own, and handed to the agent, which switches between two batches.

The batch in flight finishes with the runtime it was prepared with, so each output pairs one
bundle's short-term vector with that bundle's long-term vector; Redis vectors written by
another bundle are not read after the switch (the user is served short-term only until the
refresher, which swaps too, has re-encoded them).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

from streams.bundle_watch import BundleRef, BundleWatcher

log = logging.getLogger(__name__)
R = TypeVar("R")


class BundleSwap(Generic[R]):
    """check() starts loading a candidate; take() returns it, loaded, once (at a batch boundary)."""

    def __init__(self, watcher: BundleWatcher, load: Callable[[BundleRef], R]):
        self.watcher = watcher
        self.load = load  # runs in a thread: a bundle's sessions take ~1 s to open and warm
        # its own thread at the lowest CPU priority: the event loop and the inference thread
        # keep the cores while a bundle is hashed and its sessions opened (about a second)
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="bundle-loader",
                                         initializer=_lowest_priority)
        self.loading: BundleRef | None = None
        self.ready: tuple[BundleRef, R] | None = None
        self.swaps = 0
        self.swapped_at: float | None = None

    def check(self) -> None:
        """Look at the bundle location; start loading what it names if that is new."""
        if self.loading is not None or self.ready is not None:
            return
        ref = self.watcher.candidate()
        if ref is None:
            return
        log.info("bundle %s published: loading it beside %s", ref.describe(),
                 self.watcher.loaded.version if self.watcher.loaded else "the running one")
        self.loading = ref
        future = asyncio.get_running_loop().run_in_executor(self.loader, self.load, ref)
        future.add_done_callback(lambda f: self._loaded(ref, f))

    def _loaded(self, ref: BundleRef, future: asyncio.Future) -> None:
        self.loading = None
        try:
            runtime = future.result()
        except Exception as exc:  # BundleError, ONNX errors, anything: the old one keeps serving
            self.watcher.refuse(ref, f"{type(exc).__name__}: {exc}")
            return
        self.ready = (ref, runtime)

    def take(self) -> R | None:
        """The loaded successor, once; the caller switches to it before its next batch."""
        if self.ready is None:
            return None
        (ref, runtime), self.ready = self.ready, None
        self.watcher.accept(ref)
        self.swaps += 1
        self.swapped_at = time.time()
        return runtime

    def describe(self) -> dict:
        """For /models: what is loaded, what is on its way, what was refused and why."""
        w = self.watcher
        return {"bundle_dir": str(w.location),
                "loaded": None if w.loaded is None else {"version": w.loaded.version,
                                                          "path": str(w.loaded.path)},
                "loading": None if self.loading is None else self.loading.version,
                "waiting_for_batch": None if self.ready is None else self.ready[0].version,
                "refused": None if w.refused is None else {"version": w.refused.version,
                                                            "path": str(w.refused.path),
                                                            "reason": w.refusal},
                "swaps": self.swaps, "swapped_at": self.swapped_at}


def _lowest_priority() -> None:
    """Nice 19 for the calling thread only (Linux: a thread's nice is its own)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError):
        pass
