"""The worker on the real local Kafka and Redis: N events in, N recommendations out."""
from __future__ import annotations

import json

import pytest
from conftest import unique_settings
from helpers import collect, make_events, send

from streams.bundle import load_bundle
from streams.kafka.clients import ensure_topics

pytestmark = pytest.mark.integration


def test_n_events_in_n_recommendations_out(stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle, top_k=5, fusion_mode="fixed")
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:12]
    events = make_events(60, users=6, items=items)
    send(settings, events)
    out = collect(settings, settings.topic_recommendations, len(events), settle=2.0)
    assert sorted(r["event_id"] for r in out) == sorted(e.event_id for e in events)
    by_id = {e.event_id: e for e in events}
    seen_so_far: dict[str, list[str]] = {}
    for rec in sorted(out, key=lambda r: by_id[r["event_id"]].ts):
        event = by_id[rec["event_id"]]
        seen_so_far.setdefault(event.user_id, []).append(event.item_id)
        assert rec["user_id"] == event.user_id and rec["event_ts"] == event.ts
        assert len(rec["items"]) == 5
        assert 0.0 <= rec["alpha"] <= 1.0
        assert rec["fusion_mode"] == "fixed"
        assert rec["model_version"] == load_bundle(quick_bundle).version
        assert rec["emitted_ts"] >= rec["event_ts"]
        assert len(rec["interest"]) == load_bundle(quick_bundle).dims["d_model"]
        recommended = {i["item_id"] for i in rec["items"]}
        # the items the user has just seen (its short-term window) are never recommended
        assert not recommended & set(seen_so_far[event.user_id][-20:])
        scores = [i["score"] for i in rec["items"]]
        assert scores == sorted(scores, reverse=True)


def test_bad_events_go_to_dlq_while_good_ones_flow(stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:5]
    good = make_events(20, items=items)
    bad = [b"{not json", b"\xff\xfe\x00binary", b"[1,2]",
           json.dumps({"event_id": "x", "user_id": "u", "item_id": "no-such-item",
                       "event_type": "click", "ts": 1_800_000_000_000 // 2}).encode(),
           json.dumps({"event_id": "x", "user_id": "u", "item_id": items[0],
                       "event_type": "click", "ts": 10**15}).encode(),
           json.dumps({"event_id": "x", "user_id": 3.5, "item_id": items[0],
                       "event_type": "click", "ts": 1_800_000_000_000 // 2}).encode(),
           b"{" + b" " * 10_000 + b"}"]
    send(settings, good[:10], raw=bad)
    send(settings, good[10:])
    out = collect(settings, settings.topic_recommendations, len(good), settle=1.0)
    dlq = collect(settings, settings.topic_dlq, len(bad), settle=1.0)
    assert sorted(r["event_id"] for r in out) == sorted(e.event_id for e in good)
    assert sorted(d["reason"] for d in dlq) == sorted([
        "invalid_json", "invalid_json", "not_an_object", "unknown_item", "ts_in_future",
        "wrong_type", "payload_too_large"])
    binary = next(d for d in dlq if d["payload_encoding"] == "base64")
    import base64
    assert base64.b64decode(binary["payload"]) == b"\xff\xfe\x00binary"
    assert all(d["topic"] == settings.topic_events and d["offset"] >= 0 for d in dlq)
