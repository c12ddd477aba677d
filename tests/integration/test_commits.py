"""The worker's own offset commits on the real broker: transaction markers are offsets with no
record, so the commit frontier stops at them until the log is read there."""
from __future__ import annotations

import time

import pytest
from confluent_kafka import TopicPartition
from conftest import unique_settings
from helpers import collect, make_events, send

from streams.kafka.clients import consumer, ensure_topics, producer

pytestmark = pytest.mark.integration


def committed_and_end(settings) -> tuple[int | None, int]:
    cons = consumer(settings, settings.kafka_bootstrap_servers, settings.app_id)
    try:
        tp = TopicPartition(settings.topic_events, 0)
        committed = cons.committed([tp], timeout=10)[0].offset
        _, high = cons.get_watermark_offsets(tp, timeout=10)
    finally:
        cons.close()
    return (committed if committed >= 0 else None), high


def test_commits_step_over_transaction_markers(stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle, partitions=1, hole_check_s=1.0)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    events = make_events(40, users=4)
    prod = producer(settings, stack["kafka"], **{"transactional.id": f"tx-{settings.app_id}"})
    prod.init_transactions(30)
    for start in range(0, 40, 10):  # 4 transactions: 40 records and 4 commit markers
        prod.begin_transaction()
        for e in events[start:start + 10]:
            prod.produce(settings.topic_events, key=e.user_id.encode(), value=e.to_json())
        prod.commit_transaction(30)
    out = collect(settings, settings.topic_recommendations, 40, timeout=60)
    assert {r["event_id"] for r in out} == {e.event_id for e in events}
    # Inner markers are stepped over once the log was read there; the last marker has no
    # record after it yet, so it is stepped over when the next record is processed.
    assert wait_committed(settings, 43) == (43, 44)
    send(settings, make_events(1, users=1))
    assert wait_committed(settings, 45) == (45, 45)
    assert b"hold no record: skipped" in worker.log_path.read_bytes()


def wait_committed(settings, offset: int, timeout: float = 60.0) -> tuple[int | None, int]:
    deadline = time.monotonic() + timeout
    while True:
        committed, end = committed_and_end(settings)
        if committed == offset or time.monotonic() > deadline:
            return committed, end
        time.sleep(0.5)


def test_a_worker_stopped_by_sigterm_mid_stream_republishes_nothing(stack, quick_bundle, workers):
    """A clean stop flushes the outputs and commits the offsets of everything delivered before
    the worker leaves its group: the restarted worker publishes each event exactly once."""
    from collections import Counter

    from test_recovery import send_paced

    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    first = workers(settings)
    events = make_events(300, users=20)
    sender = send_paced(settings, events, rate=150)
    time.sleep(1.0)  # mid-stream
    first.stop()  # SIGTERM
    assert first.proc.returncode == 0, first.tail()
    workers(settings)
    sender.join()
    out = collect(settings, settings.topic_recommendations, 0, settle=3.0,
                  until_ids={e.event_id for e in events})
    counts = Counter(r["event_id"] for r in out)
    assert set(counts) == {e.event_id for e in events}  # nothing lost
    assert [e for e, n in counts.items() if n > 1] == []  # nothing published twice
