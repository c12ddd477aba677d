"""A bundle published during a steady stream is swapped in without a restart (real Kafka, Redis)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest
from conftest import ROOT, settings_env, unique_settings
from helpers import collect, copy_bundle, make_events, send

from streams.bundle import load_bundle
from streams.bundle_watch import publish
from streams.kafka.clients import ensure_topics
from streams.longterm.refresher import LongTermRefresher
from streams.longterm.store import queue_reencoding, take_dirty, write_vectors

pytestmark = pytest.mark.integration


def models(port: int) -> dict:
    """The worker's /models for its only arm (no AB_ARMS)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=5) as reply:
        return json.loads(reply.read())["arms"][""]


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_bundle_published_mid_stream_is_swapped_in_and_a_broken_one_refused(
        stack, quick_bundle, workers, redis_sync, tmp_path):
    a = copy_bundle(quick_bundle, tmp_path / "a", "swap-A")
    b = copy_bundle(quick_bundle, tmp_path / "b", "swap-B")
    broken = copy_bundle(quick_bundle, tmp_path / "broken", "swap-broken", corrupt="fusion.onnx")
    location = tmp_path / "current"
    publish(location, a)
    settings = unique_settings(stack, location, fusion_mode="fixed", fusion_alpha=0.5,
                               bundle_watch_s=0.5)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    port = int(worker.env["WEB_PORT"])
    items = load_bundle(a).items.item_ids[:20]
    tag = settings.app_id
    warm = make_events(60, users=12, items=items, prefix=f"{tag}-warm")
    warm = [e.__class__(e.event_id, f"{tag}-{e.user_id}", e.item_id, e.event_type, e.ts)
            for e in warm]
    send(settings, warm)
    collect(settings, settings.topic_recommendations, len(warm))
    refresher = LongTermRefresher(redis_sync, load_bundle(location), location=location)
    assert refresher.refresh_once() >= 12  # every user has a vector of A

    # a steady stream of 100 events/s while B, then a broken bundle, are published
    stream = make_events(900, users=12, items=items, prefix=f"{tag}-live")
    stream = [e.__class__(e.event_id, f"{tag}-{e.user_id}", e.item_id, e.event_type, e.ts)
              for e in stream]

    def replay():
        for start in range(0, len(stream), 10):
            send(settings, stream[start:start + 10])
            time.sleep(0.1)

    sender = threading.Thread(target=replay)
    sender.start()
    time.sleep(2.0)
    publish(location, b)
    wait_for(lambda: models(port)["model_version"] == "swap-B", what="the worker on B")
    assert refresher.switch_to_published()  # the refresher follows, and queues A's users
    assert refresher.refresh_once() >= 12  # re-encoded for B
    time.sleep(1.0)
    publish(location, broken)
    os.kill(worker.proc.pid, signal.SIGHUP)  # look now (and SIGHUP must not stop the worker)
    wait_for(lambda: (models(port)["refused"] or {}).get("version") == "swap-broken",
             what="the broken bundle refused")
    assert "corrupt" in models(port)["refused"]["reason"]
    assert not refresher.switch_to_published()  # refused by the refresher too
    assert refresher.bundle.version == "swap-B"
    sender.join()

    ids = {e.event_id for e in warm + stream}
    out = collect(settings, settings.topic_recommendations, 0, until_ids=ids, settle=1.0,
                  where=True)
    counts = Counter(r["event_id"] for r in out)
    assert set(counts) == ids  # every event has its output
    assert sum(counts.values()) - len(ids) == 0  # and no duplicates (no fault here)
    assert worker.proc.poll() is None
    versions = Counter(r["model_version"] for r in out)
    assert set(versions) == {"swap-A", "swap-B"} and versions["swap-B"] > 100
    for partition in {r["_partition"] for r in out}:
        seq = [r["model_version"] for r in sorted(out, key=lambda r: r["_offset"])
               if r["_partition"] == partition]
        switch = seq.index("swap-B")
        assert set(seq[:switch]) == {"swap-A"} and set(seq[switch:]) == {"swap-B"}, partition
    # no output pairs one bundle's short-term vector with another's long-term vector
    served = [r for r in out if r["long_term"] is not None]
    assert all(r["long_term"]["model"] == r["model_version"] for r in served)
    assert any(r["model_version"] == "swap-B" for r in served)  # B's own vectors, once written

    cli = subprocess.run([sys.executable, "-m", "streams", "models", "--worker",
                          f"127.0.0.1:{port}"], env=settings_env(settings), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    answer = json.loads(cli.stdout)["arms"][""]
    assert answer["model_version"] == "swap-B" and answer["swaps"] == 1
    assert answer["loaded"]["path"] == str(b.resolve())


def test_the_refresher_queues_only_users_whose_vector_another_bundle_wrote(redis_sync):
    prefix = f"queue-{time.time_ns()}"
    users = [f"{prefix}-{i}" for i in range(5)]
    take_dirty(redis_sync, 1_000_000)
    vec = [[0.0, 1.0]] * 2
    write_vectors(redis_sync, users[:2], vec, "old-model", 0)
    write_vectors(redis_sync, users[2:4], vec, "new-model", 0)
    redis_sync.hset(f"is:lt:{users[4]}", mapping={"vec": b"\0" * 8, "version": 1, "ts": 0})
    queued = queue_reencoding(redis_sync, lambda user: "new-model", chunk=2)
    dirty = set(take_dirty(redis_sync, 1_000_000))
    assert {users[0], users[1], users[4]} <= dirty and not {users[2], users[3]} & dirty
    assert queued >= 3
