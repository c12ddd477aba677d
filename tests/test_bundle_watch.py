"""Which published bundle the watcher offers for loading (pure file-system logic)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from streams.bundle import MANIFEST
from streams.bundle_watch import BundleWatcher, current_ref, loaded_ref, publish


def bundle_dir(root: Path, name: str, version: str) -> Path:
    path = root / name
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"version": version}))
    return path


def test_a_new_target_is_offered_once_accepted(tmp_path):
    a, b = bundle_dir(tmp_path, "a", "A"), bundle_dir(tmp_path, "b", "B")
    location = tmp_path / "current"
    publish(location, a)
    watcher = BundleWatcher(location, loaded_ref(location, "A"))
    assert watcher.candidate() is None  # what is loaded
    publish(location, b)
    ref = watcher.candidate()
    assert (ref.path, ref.version) == (b.resolve(), "B")
    watcher.accept(ref)
    assert watcher.candidate() is None


def test_a_manifest_rewritten_with_its_version_is_no_new_bundle(tmp_path):
    a = bundle_dir(tmp_path, "a", "A")
    watcher = BundleWatcher(a, loaded_ref(a, "A"))
    (a / MANIFEST).write_text(json.dumps({"version": "A", "metrics": {}}))
    assert watcher.candidate() is None
    (a / MANIFEST).write_text(json.dumps({"version": "A2"}))  # rebuilt in place
    assert watcher.candidate().version == "A2"


def test_a_refused_bundle_is_not_offered_again_until_its_manifest_changes(tmp_path):
    a, b = bundle_dir(tmp_path, "a", "A"), bundle_dir(tmp_path, "b", "B")
    location = tmp_path / "current"
    publish(location, a)
    watcher = BundleWatcher(location, loaded_ref(location, "A"))
    publish(location, b)
    watcher.refuse(watcher.candidate(), "checksum")
    assert watcher.candidate() is None and watcher.refusal == "checksum"
    (b / MANIFEST).write_text(json.dumps({"version": "B", "fixed": True}))
    os.utime(b / MANIFEST, ns=(1, 1))  # a different mtime whatever the clock's resolution
    assert watcher.candidate().version == "B"


def test_a_location_without_a_readable_manifest_offers_nothing(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    assert current_ref(half) is None
    (half / MANIFEST).write_text("{not json")
    assert current_ref(half) is None
    assert BundleWatcher(half, None).candidate() is None
