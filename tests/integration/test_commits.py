"""The worker's own offset commits on the real broker: transaction markers are offsets with no
record, which the commit passes once the fetch has stepped over them."""
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


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_commits_step_over_an_upstreams_transaction_markers_at_once(stack, quick_bundle,
                                                                     workers, guarantee):
    """An upstream writing in transactions leaves a marker after each, and a read_committed
    reader (exactly-once) skips an aborted transaction's records: offsets with no record. The
    commit passes them as soon as the fetch has read past them; the hole check (HOLE_CHECK_S)
    is set out of reach. So a SIGKILL then republishes nothing (exactly-once)."""
    from collections import Counter

    settings = unique_settings(stack, quick_bundle, partitions=1, hole_check_s=600.0,
                               processing_guarantee=guarantee)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    events, aborted = make_events(40, users=4), make_events(10, users=2, prefix="aborted")
    prod = producer(settings, stack["kafka"], **{"transactional.id": f"tx-{settings.app_id}"})
    prod.init_transactions(30)
    for chunk in (events[:10], events[10:20], aborted, events[20:30], events[30:]):
        prod.begin_transaction()
        for e in chunk:
            prod.produce(settings.topic_events, key=e.user_id.encode(), value=e.to_json())
        if chunk is aborted:
            prod.flush(30)  # in the log before the abort (unsent records are purged)
            prod.abort_transaction(30)
        else:
            prod.commit_transaction(30)
    # 50 records and 5 markers: offsets 0..54
    out = collect(settings, settings.topic_recommendations, 0, timeout=60, settle=1,
                  until_ids={e.event_id for e in events})
    committed, end = wait_committed(settings, 54, timeout=30)
    assert end == 55
    if guarantee == "at_least_once":  # its timer commits the frontier, the last marker too
        assert wait_committed(settings, 55, timeout=30) == (55, 55)
        return
    # exactly-once commits offsets only with a batch: the last marker waits for the next one
    assert committed in (54, 55)
    assert not {e.event_id for e in aborted} & {r["event_id"] for r in out}
    worker.kill()
    workers(settings)
    late = make_events(1, users=1, prefix="late")
    send(settings, late)
    out = collect(settings, settings.topic_recommendations, 0, timeout=60, settle=2,
                  until_ids={e.event_id for e in events + late})
    counts = Counter(r["event_id"] for r in out)
    assert [i for i, n in counts.items() if n > 1] == []
    assert wait_committed(settings, 56, timeout=30) == (56, 56)


def wait_committed(settings, offset: int, timeout: float = 60.0) -> tuple[int | None, int]:
    """(committed, end) once the group committed `offset` or beyond, or at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        committed, end = committed_and_end(settings)
        if (committed is not None and committed >= offset) or time.monotonic() > deadline:
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
