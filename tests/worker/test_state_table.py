"""StateTable's own changelog writes carry the bytes Faust's table would write.

The table is the worker's real Faust table (never started); the send function is a fake
that records what it is given. That the records restore is shown on the real broker
(tests/integration/test_recovery.py, test_privacy_security.py, test_faults.py).
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import orjson
import pytest
from test_pipeline import pipeline

from streams.worker.state_table import ROLL_KEY, StateTable


class RecordingProducer:
    def __init__(self):
        self.sent = []

    async def send(self, topic, key, value, partition):
        self.sent.append((topic, key, value, partition))
        return asyncio.get_running_loop().create_future()


@pytest.fixture
def direct():
    table = pipeline.short_term_table
    producer = RecordingProducer()
    states = StateTable(table, send=producer.send)
    yield states, producer, table
    table.data.clear()


def record(partition: int):
    return SimpleNamespace(message=SimpleNamespace(partition=partition))


def test_a_put_writes_the_record_faust_would_write_to_the_events_partition(direct):
    states, producer, table = direct
    state = {"items": [["7", 1000, "click"], ["9", 1001, "view"]], "event_ids": ["a", "é"],
             "n_events": 2}
    asyncio.run(states.put(record(3), "üser-1", state))

    changelog = table.changelog_topic
    [(topic, key, value, partition)] = producer.sent
    assert topic == changelog.get_topic_name() == "interest-stream-short_term-changelog"
    # what Table.send_changelog passes to the topic: the table's key and value serializers
    assert key == changelog.prepare_key("üser-1", table.key_serializer)[0] == '"üser-1"'.encode()
    assert value == changelog.prepare_value(state, table.value_serializer)[0]
    assert partition == 3
    assert states.get("üser-1") == state == table.get("üser-1")


def test_a_delete_writes_a_tombstone_held_or_not(direct):
    states, producer, table = direct
    asyncio.run(states.put(record(1), "u", {"n_events": 1}))
    asyncio.run(states.delete(record(1), "u"))
    assert producer.sent[-1] == (table.changelog_topic.get_topic_name(), b'"u"', None, 1)
    assert states.get("u") is None

    asyncio.run(states.delete(record(0), "never-seen"))  # a forget is recorded all the same
    assert producer.sent[-1][1:] == (b'"never-seen"', None, 0) and len(producer.sent) == 3


def test_the_roll_marker_is_a_tombstone_of_a_key_no_user_or_forget_can_name(direct):
    """The marker that rolls a quiet partition's segment: no event or forget is ever keyed
    by it, and restoring it deletes nothing."""
    from streams.events import EventRules, decode_event, parse_control

    states, producer, table = direct
    asyncio.run(states.put(record(3), "u", {"n_events": 1}))
    asyncio.run(states.roll_marker(3))
    assert producer.sent[-1] == (table.changelog_topic.get_topic_name(), b'""', None, 3)
    assert orjson.loads(producer.sent[-1][1]) == ROLL_KEY
    raw = {"event_id": "e", "user_id": ROLL_KEY, "item_id": "1", "event_type": "click",
           "ts": 1_700_000_000_000}
    assert decode_event(orjson.dumps(raw), EventRules({"click"}), 1_700_000_000_000).reason == \
        "wrong_type"
    assert parse_control(orjson.dumps({"control": "forget", "user_id": ROLL_KEY}),
                         None).reason == "invalid_control"

    restored = SimpleNamespace(key=ROLL_KEY, value=None,
                               message=SimpleNamespace(value=None, partition=3))
    table.apply_changelog_batch([restored])  # what Faust's recovery does with it
    assert dict(table.data) == {"u": {"n_events": 1}}


def test_a_rollback_puts_back_what_the_journal_saw_first_for_its_partitions_only(direct):
    """Exactly-once: a transaction that does not commit leaves the memory as it found it."""
    states, _, table = direct
    asyncio.run(states.put(record(0), "kept", {"n_events": 1}))
    asyncio.run(states.put(record(1), "other", {"n_events": 1}))
    states.begin_journal()
    asyncio.run(states.put(record(0), "kept", {"n_events": 2}))
    asyncio.run(states.put(record(0), "kept", {"n_events": 3}))
    asyncio.run(states.put(record(0), "new", {"n_events": 1}))
    asyncio.run(states.put(record(1), "other", {"n_events": 2}))
    states.rollback({0})
    states.end_journal()
    assert states.get("kept") == {"n_events": 1}  # the value before the first change
    assert states.get("new") is None and "new" not in table.data
    assert states.get("other") == {"n_events": 2}  # partition 1 committed: kept


def test_a_rollback_brings_back_a_forgotten_state(direct):
    states, _, _ = direct
    asyncio.run(states.put(record(2), "u", {"n_events": 4}))
    states.begin_journal()
    asyncio.run(states.delete(record(2), "u"))
    states.rollback({2})
    states.end_journal()
    assert states.get("u") == {"n_events": 4}


def test_a_partition_is_quiet_until_a_record_is_written_to_it(direct):
    """Only a partition the table has not written to needs a roll marker."""
    states, _, _ = direct
    before = time.monotonic()
    assert states.quiet({0, 1, 2}, since=before) == {0, 1, 2}
    asyncio.run(states.put(record(1), "u", {"n_events": 1}))
    asyncio.run(states.roll_marker(2))
    assert states.quiet({0, 1, 2}, since=before) == {0}
    assert states.quiet({0, 1, 2}, since=time.monotonic() + 1) == {0, 1, 2}
