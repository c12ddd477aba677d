"""Writes to the short-term state table: its memory and its changelog, one record per change.

The worker puts the new state in the table's memory and the changelog record straight on the
producer, as it sends its outputs: the bytes Faust's `table[key] = value`
writes (JSON key, the table's orjson value, a null value for a delete) to the partition of the
event that changed the state, queued in call order with every other record. Faust's own path
queues each record in its producer buffer and publishes it later through
`Topic.publish_message` (a FutureMessage, a done callback, sensors); in the benchmark that cost
the event loop ~6 us per event for 0.08 changelog records per event (loop CPU per event
128/132 -> 123/125 us, interleaved runs).

A state reaches the broker before an offset it includes is committed: at-least-once, the
committer flushes the producer before every commit (`streams.worker.committer`); exactly-once,
the record is in the transaction of the event's partition, with that partition's offsets, and a
transaction that does not commit has its changes to the memory put back (`begin_journal`,
`rollback`; `streams.worker.transactions`).

The broker never compacts a changelog's active segment and rolls it only on an append (once
the segment is `segment.ms` old, `streams.kafka.clients.changelog_configs`). A forget's
tombstone in a partition that then stays quiet would leave the user's earlier states readable
for good, so the worker appends a roll marker (`roll_marker`, the tombstone of a key no user
has) to each partition it owns and has not written to for a quarter of FORGET_WITHIN_S (a
busy partition rolls by itself). Nothing is remembered per forget: a worker restarted or
handed the partition by a rebalance keeps the bound.
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable

import orjson


_ABSENT = object()
# The key of the roll marker: never a user's (a user id has 1 to 128 printable characters,
# `streams.events`). Restored, its tombstone deletes nothing.
ROLL_KEY = ""


class StateTable:
    """A Faust table of JSON values whose changelog the worker writes itself.

    `send(topic, key, value, partition)` queues a record on the producer (at-least-once,
    `streams.app.send_raw` bound to the app) or in the partition's transaction (exactly-once,
    `TransactionalBatches.send`)."""

    def __init__(self, table, send: Callable[..., Awaitable]) -> None:
        self.table, self.send = table, send
        self._topic: str | None = None  # the changelog topic's name, looked up on first write
        self._written: dict[int, float] = {}  # partition -> monotonic time of its last record
        # (partition, key) -> the value before the first change since begin_journal()
        self._journal: dict[tuple[int, str], object] | None = None

    def begin_journal(self) -> None:
        """Remember each key's value before its first change from now on (exactly-once: a
        transaction that does not commit must leave the memory as it found it)."""
        self._journal = {}

    def rollback(self, partitions: set[int]) -> None:
        """Put back the values the journal holds for keys changed from `partitions`."""
        for (partition, key), value in (self._journal or {}).items():
            if partition in partitions:
                if value is _ABSENT:
                    self.table.data.pop(key, None)
                else:
                    self.table.data[key] = value

    def end_journal(self) -> None:
        self._journal = None

    def _remember(self, partition: int, key: str) -> None:
        if self._journal is not None and (partition, key) not in self._journal:
            self._journal[(partition, key)] = self.table.data.get(key, _ABSENT)

    def get(self, key: str):
        # The table's store: Faust's `table.get` adds a Python `__getitem__`, a sensor call
        # and `__missing__` (0.53 vs 0.11 us a call, once per event).
        return self.table.data.get(key)

    async def put(self, faust_event, key: str, value) -> None:
        """Set `key` from the record `faust_event` (its partition is the changelog's)."""
        self._remember(faust_event.message.partition, key)
        self.table.data[key] = value
        await self._send(faust_event.message.partition, key, orjson.dumps(value))

    async def delete(self, faust_event, key: str) -> None:
        """Remove `key` and write its tombstone, held or not: a forget is always recorded."""
        self._remember(faust_event.message.partition, key)
        self.table.data.pop(key, None)
        await self._send(faust_event.message.partition, key, None)

    def quiet(self, partitions: set[int], since: float) -> set[int]:
        """Those of `partitions` this table has written no record to since `since`."""
        return {p for p in partitions if self._written.get(p, float("-inf")) < since}

    async def roll_marker(self, partition: int) -> None:
        """Append the roll marker to `partition`'s changelog: a segment that has reached
        segment.ms is rolled, so a forget's tombstone in it can be compacted."""
        await self._send(partition, ROLL_KEY, None)

    async def _send(self, partition: int, key: str, value: bytes | None) -> None:
        if self._topic is None:
            self._topic = self.table.changelog_topic.get_topic_name()
        await self.send(self._topic, orjson.dumps(key), value, partition)
        self._written[partition] = time.monotonic()
