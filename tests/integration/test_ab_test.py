"""A/B arms on the real broker and Redis: users split by a stable hash, each arm's bundle and
fusion mode, each arm's own long-term vectors, and online metrics per arm that the output
topic reproduces."""
from __future__ import annotations

import dataclasses
import math
import urllib.request

import pytest
from conftest import unique_settings
from helpers import collect, copy_bundle, make_events, send
from prometheus_client.parser import text_string_to_metric_families

from streams.arms import arm_of
from streams.bundle import load_bundle
from streams.kafka.clients import ensure_topics
from streams.longterm.refresher import LongTermRefresher
from streams.longterm.store import read_vector
from streams.tools.online import PrequentialEvaluator

pytestmark = pytest.mark.integration


def online_counters(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("online_") and sample.name.endswith("_total"):
                out[(sample.name, sample.labels["arm"])] = sample.value
    return out


def test_two_arms_split_users_serve_their_bundles_and_count_their_online_metrics(
        stack, quick_bundle, workers, redis_sync, tmp_path):
    a = copy_bundle(quick_bundle, tmp_path / "a", "arm-A")
    b = copy_bundle(quick_bundle, tmp_path / "b", "arm-B")
    settings = unique_settings(stack, quick_bundle, ab_arms=f"control:{a},treatment:{b}@gate",
                               top_k=10)
    settings = dataclasses.replace(settings, ab_salt=settings.app_id)  # its own deal
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    arms, salt = settings.arms(), settings.ab_salt
    version = {"control": "arm-A", "treatment": "arm-B"}
    items = load_bundle(a).items.item_ids[:30]
    tag = settings.app_id
    events = [e.__class__(e.event_id, f"{tag}-{e.user_id}", e.item_id, e.event_type, e.ts)
              for e in make_events(400, users=40, items=items, prefix=f"{tag}-1")]
    send(settings, events)
    out = collect(settings, settings.topic_recommendations, 0,
                  until_ids={e.event_id for e in events}, settle=1.0)
    assert len(out) == len(events)
    for rec in out:
        arm = arm_of(rec["user_id"], arms, salt).name
        assert rec["arm"] == arm and rec["model_version"] == version[arm]
        assert rec["fusion_mode"] == ("gate" if arm == "treatment" else
                                      load_bundle(a).manifest["default_fusion_mode"])
    assert {r["arm"] for r in out} == {"control", "treatment"}

    # the worker's per-arm online counters are what the output topic gives, arm by arm
    evaluator, expected = PrequentialEvaluator(k=10), {}
    for rec in out:
        rank = evaluator.update(rec)
        if rank is not None:
            arm = rec["arm"]
            expected[("online_scored_total", arm)] = expected.get(("online_scored_total", arm), 0) + 1
            expected[("online_hits_total", arm)] = expected.get(("online_hits_total", arm), 0) + (rank <= 10)
            gain = 1 / math.log2(rank + 1) if rank <= 10 else 0.0
            expected[("online_ndcg_sum_total", arm)] = expected.get(("online_ndcg_sum_total", arm), 0) + gain
    counters = online_counters(int(worker.env["WEB_PORT"]))
    for key, value in expected.items():
        assert counters[key] == pytest.approx(value, abs=1e-9), key
    assert all(counters[("online_scored_total", arm)] > 100 for arm in version)

    # the refresher encodes each user with their arm's bundle; the worker serves it
    refresher = LongTermRefresher(redis_sync, load_bundle(a), arms=arms, salt=salt)
    refresher.refresh_once()
    users = sorted({e.user_id for e in events})
    d = load_bundle(a).dims["d_model"]
    for user in users:
        arm = arm_of(user, arms, salt).name
        assert read_vector(redis_sync, user, version[arm], d) is not None, user
        other = version["treatment" if arm == "control" else "control"]
        assert read_vector(redis_sync, user, other, d) is None

    # after a restart every user is in the same arm, now with its arm's long-term vector
    worker.stop()
    workers(settings)
    later = [e.__class__(e.event_id, f"{tag}-{e.user_id}", e.item_id, e.event_type, e.ts + 10_000)
             for e in make_events(40, users=40, items=items, prefix=f"{tag}-2")]
    send(settings, later)
    again = collect(settings, settings.topic_recommendations, 0,
                    until_ids={e.event_id for e in later}, settle=1.0)
    fresh = [r for r in again if r["event_id"].startswith(f"{tag}-2")]
    assert len(fresh) == 40
    for rec in fresh:
        arm = arm_of(rec["user_id"], arms, salt).name
        assert rec["arm"] == arm and rec["model_version"] == version[arm]
        assert rec["long_term"] is not None and rec["long_term"]["model"] == version[arm]
