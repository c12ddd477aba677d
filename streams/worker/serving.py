"""What the worker serves: one bundle for everyone, or one per A/B arm (AB_ARMS), each swapped
for a newly published one without a restart.

A user's arm comes from a stable hash (`streams.arms`); the user's short-term state, history
and long-term vector are the same whatever the arm, except that a vector is used only by the
arm whose bundle wrote it. No Faust here: the agent (`pipeline`) calls into this.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from streams.arms import Arm, arm_of
from streams.bundle import Bundle, load_bundle
from streams.bundle_watch import BundleWatcher, loaded_ref
from streams.config import Settings
from streams.events import EventRules
from streams.inference import Recommender
from streams.local.endpoints import resolve_redis
from streams.longterm.store import LongTermStore, redis_client
from streams.worker.bundle_swap import BundleSwap

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """One served variant: the bundle, its models, its fusion mode, and the shared store."""

    settings: Settings
    bundle: Bundle
    recommender: Recommender
    rules: EventRules
    store: LongTermStore | None
    fusion_mode: str
    fixed_alpha: float
    weights: dict[str, float]
    # One thread for onnxruntime, shared by the worker's runtimes (their batches never overlap):
    # it overlaps the event loop's work on the second core.
    executor: ThreadPoolExecutor
    arm: str = ""  # "" without arms
    mode_override: str = ""  # the arm's fusion mode, kept by its successors

    @classmethod
    def with_bundle(cls, settings: Settings, bundle: Bundle, store: LongTermStore | None,
                    executor: ThreadPoolExecutor, arm: str = "", mode_override: str = ""
                    ) -> "Runtime":
        """A runtime serving `bundle` with the worker's store and inference thread."""
        # known_items: the dict itself, whose `in` is one C call (the index's is a Python one)
        rules = event_rules(settings, bundle.items.row_of)
        mode = mode_override or settings.fusion_mode or \
            bundle.manifest.get("default_fusion_mode", "fixed")
        alpha = settings.fusion_alpha
        alpha = float(bundle.manifest.get("fixed_alpha", 0.5)) if alpha is None else alpha
        return cls(settings, bundle, Recommender(bundle), rules, store, mode, alpha,
                   settings.weights(), executor, arm, mode_override)

    def successor(self, path: Path) -> "Runtime":
        """A runtime for the bundle at `path`, loaded and checked beside this one (in a
        thread of its own): checksums, then one warm-up batch through every graph."""
        rt = Runtime.with_bundle(self.settings, load_bundle(path), self.store, self.executor,
                                 self.arm, self.mode_override)
        rt.recommender.check(rt.fusion_mode, rt.fixed_alpha, self.settings.top_k)
        return rt


def event_rules(settings: Settings, known_items: dict) -> EventRules:
    return EventRules(event_types=frozenset(settings.weights()), known_items=known_items,
                      max_payload_bytes=settings.max_payload_bytes,
                      max_future_skew_ms=int(settings.max_future_skew_s * 1000))


def open_store(settings: Settings, bundle: Bundle) -> LongTermStore | None:
    url = resolve_redis(settings)
    if not url:
        log.warning("no Redis configured (REDIS_URL): short-term recommendations only")
        return None
    return LongTermStore(redis_client(url, settings.redis_password, settings.redis_timeout_s),
                         bundle.version, int(bundle.dims["d_model"]), settings.long_history_cap,
                         settings.redis_timeout_s, settings.redis_retry_s)


class Serving:
    """The worker's runtimes by arm ("" without arms), and a bundle swap for each."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.arms: tuple[Arm, ...] = settings.arms()
        self.runtimes: dict[str, Runtime] = {}
        self.swaps: dict[str, BundleSwap[Runtime]] = {}
        self.rules: EventRules | None = None  # validation: items of any arm's catalog

    def load(self) -> "Serving":
        variants = [("", self.settings.bundle_dir, "")] if not self.arms else \
            [(a.name, a.bundle_dir, a.fusion_mode) for a in self.arms]
        bundles = [(name, mode, location, load_bundle(location))
                   for name, location, mode in variants]
        store = open_store(self.settings, bundles[0][3])
        executor = ThreadPoolExecutor(1)
        for name, mode, location, bundle in bundles:
            self.runtimes[name] = Runtime.with_bundle(self.settings, bundle, store, executor,
                                                      name, mode)
            self.swaps[name] = BundleSwap(
                BundleWatcher(location, loaded_ref(bundle.path, bundle.version)),
                lambda ref, name=name: self.runtimes[name].successor(ref.path))
        self._rules()
        return self

    @property
    def primary(self) -> Runtime:
        """The first runtime: what all of them share (store, settings, inference thread)."""
        return next(iter(self.runtimes.values()))

    def arm_of(self, user_id: str) -> str:
        return arm_of(user_id, self.arms, self.settings.ab_salt).name if self.arms else ""

    def runtime_of(self, user_id: str) -> Runtime:
        return self.runtimes[self.arm_of(user_id)] if self.arms else self.primary

    def look_for_published(self) -> None:
        for swap in self.swaps.values():
            swap.check()

    def switch_to_published(self) -> bool:
        """Between two batches: each arm whose new bundle is loaded and checked switches."""
        switched = False
        for name, swap in self.swaps.items():
            successor = swap.take()
            if successor is not None:
                self.runtimes[name], switched = successor, True
        if switched:
            self._rules()
        return switched

    def _rules(self) -> None:
        if len(self.runtimes) == 1:
            self.rules = self.primary.rules
            return
        known: dict = {}
        for rt in self.runtimes.values():
            known.update(rt.bundle.items.row_of)  # validity only: rows come from the user's arm
        self.rules = event_rules(self.settings, known)

    def describe(self) -> dict:
        """/models: per arm, the bundle served, its fusion mode and its swap's state."""
        out = {}
        for name, rt in self.runtimes.items():
            arm = next((a for a in self.arms if a.name == name), None)
            out[name] = {"model_version": rt.bundle.version, "fusion_mode": rt.fusion_mode,
                         "fixed_alpha": rt.fixed_alpha,
                         "item_item_weight": rt.recommender.fuser.item_item_weight,
                         "weight": None if arm is None else arm.weight,
                         **self.swaps[name].describe()}
        return out
