"""StateTable's own changelog writes carry the bytes Faust's table would write.

The table is the worker's real Faust table (never started); the send function is a fake
that records what it is given. That the records restore is shown on the real broker
(tests/integration/test_recovery.py, test_privacy_security.py, test_faults.py).
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from test_pipeline import pipeline

from streams.worker.state_table import StateTable


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


def test_a_rewrite_comes_when_due_with_the_keys_value_then(direct):
    """The second write of a forget: a tombstone if the user stayed away, else their new state
    (never a tombstone over a state written since)."""
    states, producer, table = direct
    states.rewrite_later(2, "gone", due=10.0)
    states.rewrite_later(3, "back", due=5.0)
    asyncio.run(states.put(record(3), "back", {"n_events": 1}))
    sent = len(producer.sent)
    asyncio.run(states.rewrite_due(4.9))
    assert len(producer.sent) == sent
    asyncio.run(states.rewrite_due(10.0))
    assert producer.sent[sent:] == [(table.changelog_topic.get_topic_name(), b'"back"',
                                     b'{"n_events":1}', 3),
                                    (table.changelog_topic.get_topic_name(), b'"gone"', None, 2)]
    asyncio.run(states.rewrite_due(99.0))
    assert len(producer.sent) == sent + 2


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


def test_without_rewrites_a_forget_is_not_written_again_from_a_timer(direct):
    """Exactly-once: a record sent from a timer would be outside every transaction."""
    _, producer, table = direct
    states = StateTable(table, send=producer.send, rewrites=False)
    states.rewrite_later(0, "u", due=0.0)
    asyncio.run(states.rewrite_due(now=1.0))
    assert producer.sent == []
