"""Long-term vectors in the real Redis: the store, the refresher, and Redis going away."""
from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import unique_settings
from helpers import collect, make_events, send

from streams.bundle import load_bundle
from streams.kafka.clients import ensure_topics
from streams.local.stack import LocalRedis
from streams.longterm.refresher import LongTermRefresher
from streams.longterm.store import (DIRTY, HistoryAppend, LongTermStore, forget_user, hist_key,
                                    read_histories, read_vector, redis_client, take_dirty,
                                    write_vectors)

pytestmark = pytest.mark.integration


def test_vectors_are_versioned_and_written_whole(redis_sync):
    vec = np.arange(8, dtype=np.float32)
    for expected_version in (1, 2):
        write_vectors(redis_sync, ["lt-user"], vec[None, :] * expected_version, "m1", 1000)
        got = read_vector(redis_sync, "lt-user", "m1", 8)
        assert got.version == expected_version and np.allclose(got.vec, vec * expected_version)
    assert read_vector(redis_sync, "lt-user", "another-model", 8) is None
    assert forget_user(redis_sync, "lt-user") == 1
    assert read_vector(redis_sync, "lt-user", "m1", 8) is None


def test_one_batch_reads_vectors_appends_caps_and_marks_dirty(stack, redis_sync):
    """LongTermStore.sync_batch (the worker's one round trip per batch) in the real Redis."""
    import asyncio

    tag = str(time.time_ns())
    a, b, c = f"a{tag}", f"b{tag}", f"c{tag}"
    write_vectors(redis_sync, [a], np.ones((1, 4), np.float32), "m1", 1_000)
    write_vectors(redis_sync, [c], np.ones((1, 4), np.float32), "other-model", 1_000)
    redis_sync.rpush(hist_key(b), "old")

    async def run():
        store = LongTermStore(redis_client(stack["redis"], None, 5.0), "m1", 4, history_cap=3,
                              timeout_s=5.0, retry_s=1.0)
        store.pending_forgets.add(c)  # an erasure that could not be applied earlier
        try:
            return await store.sync_batch(
                [HistoryAppend(a, "1", "a0", 1), HistoryAppend(b, "2", "b0", 1),
                 HistoryAppend(a, "3\t0.5", "a0", 2), HistoryAppend(b, "4", "b0", 2),
                 HistoryAppend(b, "5", "b0", 3)], [a, b, c])
        finally:
            await store.close()

    vectors = asyncio.run(run())
    assert set(vectors) == {a} and vectors[a].version == 1 and vectors[a].vec.tolist() == [1.0] * 4
    assert read_histories(redis_sync, [a, b]) == [[("1", 1.0), ("3", 0.5)],
                                                  [("2", 1.0), ("4", 1.0), ("5", 1.0)]]
    assert redis_sync.sismember(DIRTY, a) and redis_sync.sismember(DIRTY, b)
    assert not redis_sync.sismember(DIRTY, c) and read_vector(redis_sync, c, "other-model", 4) is None
    redis_sync.srem(DIRTY, a, b)


def test_a_retried_write_appends_nothing_twice_and_a_new_lineage_starts_over(stack, redis_sync):
    """A write that timed out on the worker's side may still run; the worker then sends the
    same appends again (its buffer). Each event is in the history once."""
    import asyncio

    user = f"retry{time.time_ns()}"
    first = [HistoryAppend(user, item, "e1", pos) for pos, item in ((1, "1"), (2, "2"))]
    later = [HistoryAppend(user, "3", "e1", 3)]

    async def run():
        store = LongTermStore(redis_client(stack["redis"], None, 5.0), "m1", 4, history_cap=10,
                              timeout_s=5.0, retry_s=1.0)
        try:
            await store.sync_batch(first, [user])
            await store.sync_batch(first + later, [user])  # the retry, with what came since
            await store.sync_batch(later, [user])
            # a forget erased the user's keys, or their state was lost: a new lineage
            await store.sync_batch([HistoryAppend(user, "4", "e9", 1)], [user])
        finally:
            await store.close()

    asyncio.run(run())
    assert [item for item, _ in read_histories(redis_sync, [user])[0]] == ["1", "2", "3", "4"]
    assert forget_user(redis_sync, user) == 2  # history and its place
    redis_sync.srem(DIRTY, user)


def test_refresher_advances_version_and_recommendations_change(stack, quick_bundle, workers,
                                                               redis_sync):
    settings = unique_settings(stack, quick_bundle, fusion_mode="fixed", fusion_alpha=0.5)
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    bundle = load_bundle(quick_bundle)
    user = f"refresh-{settings.app_id}"
    events = [e.__class__(e.event_id, user, e.item_id, e.event_type, e.ts)
              for e in make_events(6, items=bundle.items.item_ids[:6])]
    send(settings, events)
    first = collect(settings, settings.topic_recommendations, 6)
    assert all(r["long_term"] is None and r["alpha"] == 1.0 for r in first)
    assert read_histories(redis_sync, [user]) == [[(e.item_id, 1.0) for e in events]]

    refresher = LongTermRefresher(redis_sync, bundle)
    assert refresher.refresh_once() >= 1
    assert read_vector(redis_sync, user, bundle.version, bundle.dims["d_model"]).version == 1
    assert user not in take_dirty(redis_sync, 10_000)

    send(settings, [events[-1]])  # redelivered: same short-term state, now with h_l
    again = collect(settings, settings.topic_recommendations, 7)
    last = [r for r in again if r["event_id"] == events[-1].event_id]
    before, after = last[0], last[-1]
    assert after["long_term"]["version"] == 1 and after["alpha"] == 0.5
    assert after["long_term"]["age_s"] >= 0
    assert after["interest"] != before["interest"]
    assert [i["score"] for i in after["items"]] != [i["score"] for i in before["items"]]


def test_worker_adds_the_events_after_a_refresh_to_the_long_term_vector(stack, quick_bundle,
                                                                       workers, redis_sync):
    """The served long-term vector is never staler than the current event: an event after the
    refresh is added by the worker, and gives the vector a refresh including it would give."""
    settings = unique_settings(stack, quick_bundle, fusion_mode="fixed", fusion_alpha=0.0)
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    bundle = load_bundle(quick_bundle)
    assert bundle.manifest["long_term"]["model"]["incremental"]
    user = f"fresh-{settings.app_id}"
    events = [e.__class__(e.event_id, user, e.item_id, e.event_type, e.ts)
              for e in make_events(8, items=bundle.items.item_ids[10:18])]
    send(settings, events[:6])
    collect(settings, settings.topic_recommendations, 6)
    LongTermRefresher(redis_sync, bundle).refresh_once()  # covers the first 6 events
    stored = read_vector(redis_sync, user, bundle.version, bundle.dims["d_model"])
    assert stored.place is not None and stored.place[1] == 6
    send(settings, events[6:])
    served = {r["event_id"]: r for r in collect(settings, settings.topic_recommendations, 8)}
    LongTermRefresher(redis_sync, bundle).refresh_once()  # now covers all 8
    send(settings, [events[-1]])  # redelivered: the refreshed vector needs no update
    outputs = collect(settings, settings.topic_recommendations, 9)
    refreshed = [r for r in outputs if r["event_id"] == events[-1].event_id][-1]
    updated = served[events[-1].event_id]
    # alpha 0: the interest is h_l itself; rounded to 5 decimals in the message
    assert np.abs(np.array(updated["interest"]) - np.array(refreshed["interest"])).max() < 2e-4
    assert updated["interest"] != served[events[5].event_id]["interest"]
    for item in updated["items"]:
        parts = item["short_term"] + item["long_term"] + item["item_item"]
        assert abs(parts - item["score"]) < 3e-4
        assert item["short_term"] == 0.0  # alpha 0: all of the score is long-term


def test_redis_down_degrades_then_recovers(stack, quick_bundle, workers, tmp_path):
    redis = LocalRedis(tmp_path / "redis")
    url = redis.start()
    settings = unique_settings(stack, quick_bundle, redis_url=url, redis_retry_s=0.5,
                               fusion_mode="fixed", fusion_alpha=0.5)
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    bundle = load_bundle(quick_bundle)
    client = redis_client(url, None, timeout=5.0, asyncio_client=False)
    items = bundle.items.item_ids[:8]
    try:
        send(settings, make_events(10, items=items, prefix="up"))
        assert len(collect(settings, settings.topic_recommendations, 10)) == 10
        LongTermRefresher(client, bundle).refresh_once()

        redis.stop()
        down = make_events(10, items=items, prefix="down")
        send(settings, down)
        out = collect(settings, settings.topic_recommendations, 20)
        degraded = [r for r in out if r["event_id"].startswith("down")]
        assert len(degraded) == 10
        assert all(r["degraded"] and r["long_term"] is None and r["alpha"] == 1.0 for r in degraded)

        redis.start()  # same port, empty: the worker reconnects by itself
        send(settings, make_events(5, items=items, prefix="back1"))
        collect(settings, settings.topic_recommendations, 25)
        deadline = time.monotonic() + 20
        while not client.exists(hist_key("user0")) and time.monotonic() < deadline:
            time.sleep(0.2)
        # the appends made while Redis was down were kept and written on reconnect
        assert len(client.lrange(hist_key("user0"), 0, -1)) >= 3
        LongTermRefresher(client, bundle).refresh_once()
        send(settings, make_events(5, items=items, prefix="back2"))
        out = collect(settings, settings.topic_recommendations, 30)
        back = [r for r in out if r["event_id"].startswith("back2")]
        assert back and all(not r["degraded"] and r["long_term"] is not None for r in back)
    finally:
        client.close()
        redis.stop()


def test_appends_kept_while_redis_was_down_go_out_without_new_events(tmp_path):
    """The worker calls retry_pending on a timer: a quiet stream does not hold them back."""
    import asyncio

    from streams.local.stack import LocalRedis

    redis = LocalRedis(tmp_path / "redis")
    url = redis.start()
    redis.stop()

    async def run():
        store = LongTermStore(redis_client(url, None, 0.5), "m1", 4, history_cap=10,
                              timeout_s=0.5, retry_s=0.1)
        try:
            assert await store.sync_batch([HistoryAppend("q", "1", "e1", 1)], ["q"]) is None
            assert not store.up and len(store.pending) == 1
            redis.start()  # same port
            deadline = time.monotonic() + 20
            while store.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                await store.retry_pending()
            return store.up
        finally:
            await store.close()

    try:
        assert asyncio.run(run())
        client = redis_client(url, None, 5.0, asyncio_client=False)
        assert read_histories(client, ["q"]) == [[("1", 1.0)]]
        client.close()
    finally:
        redis.stop()
