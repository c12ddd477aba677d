"""Noticing that a new bundle was published at the bundle location, for a swap without a restart.

A bundle is published by building it into a directory of its own and pointing the location
(BUNDLE_DIR, usually a `current` symlink) at it in one rename, so that a reader never sees a
half-written bundle (`publish`; docs/operations.md). The watcher compares what the location names
now (the directory it resolves to and its manifest's version) with what is loaded. A
candidate that failed its checks is not tried again until its manifest changes, so a broken
bundle costs one load, not one per check.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from streams import metrics
from streams.bundle import MANIFEST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleRef:
    """One published bundle: where the location pointed and what its manifest said."""

    path: Path  # the directory the location resolved to
    version: str
    manifest_mtime_ns: int

    def describe(self) -> str:
        return f"{self.version} at {self.path}"


def current_ref(location: str | Path) -> BundleRef | None:
    """What `location` names now; None while it names no readable manifest (mid-publish)."""
    path = Path(location).resolve()
    manifest = path / MANIFEST
    try:
        stat = manifest.stat()
        version = json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return BundleRef(path, str(version), stat.st_mtime_ns)


class BundleWatcher:
    """`candidate()` is a bundle to load when the location names one other than the loaded."""

    def __init__(self, location: str | Path, loaded: BundleRef | None):
        self.location = Path(location)
        self.loaded = loaded
        self.refused: BundleRef | None = None
        self.refusal: str | None = None

    def candidate(self) -> BundleRef | None:
        ref = current_ref(self.location)
        if ref is None or ref == self.refused:
            return None
        if self.loaded is not None and (ref.path, ref.version) == (self.loaded.path,
                                                                   self.loaded.version):
            return None  # the same bundle (a manifest rewritten in place with its version kept)
        return ref

    def accept(self, ref: BundleRef) -> None:
        """`ref` is served from now on."""
        log.info("swapped bundle %s -> %s", self.loaded.version if self.loaded else "?",
                 ref.version)
        self.loaded, self.refused, self.refusal = ref, None, None
        metrics.BUNDLE_SWAPS.inc()

    def refuse(self, ref: BundleRef, reason: str) -> None:
        """`ref` failed its checks: not offered again until its manifest changes."""
        self.refused, self.refusal = ref, reason
        metrics.BUNDLE_REFUSED.inc()
        log.error("bundle %s refused, %s keeps serving: %s", ref.describe(),
                  self.loaded.version if self.loaded else "the loaded one", reason)


def loaded_ref(bundle_path: str | Path, version: str) -> BundleRef:
    """The ref of a bundle loaded from `bundle_path` at start-up."""
    path = Path(bundle_path).resolve()
    try:
        mtime = os.stat(path / MANIFEST).st_mtime_ns
    except OSError:
        mtime = 0
    return BundleRef(path, version, mtime)


def publish(location: str | Path, bundle: str | Path) -> None:
    """Point `location` (a symlink) at the bundle directory `bundle` in one rename: a watcher
    sees the old bundle or the new one, never a mix (`ln -s B L.new && mv -T L.new L`)."""
    location = Path(location)
    fresh = location.with_name(location.name + ".new")
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(Path(bundle).resolve())
    os.replace(fresh, location)
