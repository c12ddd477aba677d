"""The worker's swap hand-over: loaded in a thread, taken once, refusals kept (no Kafka)."""
from __future__ import annotations

import asyncio
import json

from streams.bundle import MANIFEST
from streams.bundle_watch import BundleWatcher, loaded_ref
from streams.worker.bundle_swap import BundleSwap


def published(tmp_path, version: str):
    path = tmp_path / version
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"version": version}))
    return path


def run_check(swap: BundleSwap) -> None:
    async def go():
        swap.check()
        swap.check()  # a second look while loading starts nothing more
        for _ in range(200):
            if swap.loading is None:
                return
            await asyncio.sleep(0.01)

    asyncio.run(go())


def test_a_loaded_bundle_is_taken_once_then_it_is_the_loaded_one(tmp_path):
    published(tmp_path, "A")
    loads = []
    swap = BundleSwap(BundleWatcher(tmp_path / "A", loaded_ref(tmp_path / "A", "old")),
                      lambda ref: loads.append(ref.version) or f"runtime-{ref.version}")
    run_check(swap)
    assert loads == ["A"] and swap.describe()["waiting_for_batch"] == "A"
    assert swap.take() == "runtime-A" and swap.take() is None
    assert swap.describe()["loaded"]["version"] == "A" and swap.swaps == 1
    run_check(swap)
    assert loads == ["A"]  # nothing new at the location


def test_a_bundle_failing_its_load_is_refused_with_its_reason(tmp_path):
    published(tmp_path, "B")

    def load(ref):
        raise ValueError("fusion.onnx is corrupt")

    swap = BundleSwap(BundleWatcher(tmp_path / "B", None), load)
    run_check(swap)
    assert swap.take() is None
    refused = swap.describe()["refused"]
    assert refused["version"] == "B" and "corrupt" in refused["reason"]
    run_check(swap)
    assert swap.describe()["loading"] is None  # not tried again
