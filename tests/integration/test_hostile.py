"""The worker under hostile input (hypothesis): it stays up, every bad record is dead-lettered
exactly once with a reason, and the good events keep flowing."""
from __future__ import annotations

import json
import time
import uuid

import orjson
import pytest
from conftest import unique_settings
from helpers import make_events, send
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streams.bundle import load_bundle
from streams.kafka.clients import consumer, ensure_topics

pytestmark = pytest.mark.integration

bad_payloads = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(st.integers() | st.text(max_size=10) | st.none(),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"event_id": st.text(min_size=1, max_size=5), "user_id": st.just("u"),
                           "item_id": st.just("not-an-item"), "event_type": st.just("click"),
                           "ts": st.just(1)}).map(lambda v: json.dumps(v).encode()),
    st.just(b'{"event_id":"e","user_id":"u","item_id":"1","event_type":"click","ts":1e400}'),
    st.just(b"[" * 3000 + b"]" * 3000),
    st.just(json.dumps({"event_id": "e", "user_id": "\u202e\u0000", "item_id": "1",
                        "event_type": "click", "ts": 1}).encode()),
)


class Tally:
    """Counts records arriving on the output and DLQ topics, continuously."""

    def __init__(self, settings):
        self.consumer = consumer(settings, settings.kafka_bootstrap_servers, f"tally-{uuid.uuid4().hex[:6]}")
        self.consumer.subscribe([settings.topic_recommendations, settings.topic_dlq])
        self.settings, self.outputs, self.dlq = settings, set(), []

    def until(self, outputs: int, dlq: int, timeout: float = 60.0, settle: float = 1.5) -> None:
        deadline, done_at = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.1)
            if msg is not None and not msg.error():
                rec = orjson.loads(msg.value())
                if msg.topic() == self.settings.topic_dlq:
                    self.dlq.append(rec)
                else:
                    self.outputs.add(rec["event_id"])
            if len(self.outputs) >= outputs and len(self.dlq) >= dlq:
                done_at = done_at or time.monotonic()
                if time.monotonic() - done_at > settle:
                    return


@pytest.fixture(scope="module")
def hostile_worker(stack, quick_bundle, tmp_path_factory):
    from conftest import WorkerProcess

    settings = unique_settings(stack, quick_bundle, max_payload_bytes=2048)
    ensure_topics(settings, stack["kafka"])
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("hostile")).start()
    worker.wait_ready()
    tally = Tally(settings)
    yield settings, worker, tally
    tally.consumer.close()
    worker.stop()


@hsettings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=st.lists(bad_payloads, min_size=5, max_size=25))
def test_every_bad_record_is_dead_lettered_once(hostile_worker, quick_bundle, bad):
    settings, worker, tally = hostile_worker
    items = load_bundle(quick_bundle).items.item_ids[:8]
    good = make_events(10, items=items)
    before_out, before_dlq = len(tally.outputs), len(tally.dlq)
    send(settings, good[:5], raw=bad)
    send(settings, good[5:])
    tally.until(before_out + len(good), before_dlq + len(bad))
    assert {e.event_id for e in good} <= tally.outputs
    new = tally.dlq[before_dlq:]
    assert len(new) == len(bad)  # each bad record exactly once
    assert all(d["reason"] and d["detail"] for d in new)
    assert worker.proc.poll() is None  # still up


def test_a_poison_event_repeated(hostile_worker, quick_bundle):
    settings, worker, tally = hostile_worker
    before_dlq = len(tally.dlq)
    poison = b'{"event_id":"p","user_id":"u","item_id":"1","event_type":"click","ts":"soon"}'
    good = make_events(20, items=load_bundle(quick_bundle).items.item_ids[:8])
    send(settings, good, raw=[poison] * 50)
    tally.until(len(tally.outputs) + 20, before_dlq + 50)
    assert {e.event_id for e in good} <= tally.outputs
    assert [d["reason"] for d in tally.dlq[before_dlq:]] == ["wrong_type"] * 50
    assert worker.proc.poll() is None
