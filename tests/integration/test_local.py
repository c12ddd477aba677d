"""The project's own local broker: started, written to, and a throwaway stack's data removed."""
from __future__ import annotations

import pytest

from conftest import unique_settings
from streams.kafka_clients import ensure_topics, produce, producer
from streams.local import LocalStack

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
