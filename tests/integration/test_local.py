"""The project's own local broker: started, written to, and a throwaway stack's data removed."""
from __future__ import annotations

import time

import pytest
from conftest import unique_settings

from streams.kafka.clients import ensure_topics, produce, producer
from streams.local.stack import LocalStack

pytestmark = pytest.mark.integration


def test_a_throwaway_stack_removes_its_topics_files_and_keeps_its_logs(tmp_path):
    stack = LocalStack(tmp_path / "stack")
    try:
        endpoints = stack.start(with_redis=False)
        settings = unique_settings({"kafka": endpoints["kafka"], "redis": None})
        ensure_topics(settings, endpoints["kafka"])
        prod = producer(settings, endpoints["kafka"])
        for i in range(100):
            produce(prod, settings.topic_events, b"u", b"x" * 1000)
        assert prod.flush(30) == 0
        data = tmp_path / "stack" / "kafka" / "data"
        assert any(data.glob(f"{settings.topic_events}-*/*.log"))
    finally:
        stack.stop(discard_data=True)
    assert not data.exists()
    logs = tmp_path / "stack" / "kafka"
    assert (logs / "server.log").stat().st_size > 0
    assert "Using G1" in (logs / "gc.log").read_text()  # the broker's GC log, kept


def test_a_tail_consumer_reads_what_is_written_after_it_on_every_topic(stack):
    """The dashboard's reader: positions fixed at the ends when it is made, not after a group
    join, so the first record written afterwards on either topic is read, and nothing before."""
    from streams.tools.dashboard.server import tail_both_topics

    settings = unique_settings(stack)
    ensure_topics(settings, stack["kafka"])
    prod = producer(settings, stack["kafka"])
    produce(prod, settings.topic_recommendations, b"u", b"before")
    produce(prod, settings.topic_dlq, b"u", b"before")
    assert prod.flush(30) == 0
    cons = tail_both_topics(settings, stack["kafka"])
    try:
        produce(prod, settings.topic_recommendations, b"u", b"after-rec")
        produce(prod, settings.topic_dlq, b"u", b"after-dlq")
        assert prod.flush(30) == 0
        seen, deadline = [], time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            msg = cons.poll(0.2)
            if msg is not None and not msg.error():
                seen.append((msg.topic(), msg.value()))
        assert sorted(seen) == sorted([(settings.topic_recommendations, b"after-rec"),
                                       (settings.topic_dlq, b"after-dlq")])
    finally:
        cons.close()
