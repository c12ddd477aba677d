"""Commits the input topics' offsets (events, control) from an `OffsetLedger` (at-least-once).

- The input topics are declared with acks off, so Faust neither tracks nor commits its offsets
  (see `streams.worker.offsets` for why Faust's bookkeeping lost records).
- Faust's "last offset read" filter is blinded for that topic: it dropped every record below
  the last offset it had read, including the redelivery of records it had skipped. The agent
  skips redeliveries itself with `OffsetLedger.seen`.
- Every COMMIT_INTERVAL_S: flush the producer, settle which records' outputs were delivered,
  commit each assigned partition's frontier.
- Offsets the fetch stepped over (transaction markers; `streams.worker.skipped_offsets`)
  count as done at once.
- A frontier that waits on a missing offset for HOLE_CHECK_S: the log is read from there.
  Offsets with no record count as done; a record that exists but was never delivered to the
  agent is fetched again by seeking the partition back to it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from faust.transport.drivers.aiokafka import ensure_aiokafka_TP
from faust.types import TP

from streams.config import Settings
from streams.kafka import clients as kafka_clients
from streams.local.endpoints import resolve_kafka
from streams.worker import skipped_offsets
from streams.worker.offsets import OffsetLedger

log = logging.getLogger(__name__)


class BlindReadOffsets(dict):
    """Faust's per-partition last-read offsets, always unknown (None) for some topics."""

    def __init__(self, topics: frozenset[str], initial: dict) -> None:
        super().__init__(initial)
        self.topics = topics

    def __missing__(self, tp):
        return None

    def __getitem__(self, tp):
        return None if tp.topic in self.topics else super().__getitem__(tp)


class Committer:
    """Owns the commit of the input topics' offsets for one worker."""

    isolation = "read_uncommitted"  # how the worker's consumer reads (holes are looked up so)

    def __init__(self, app, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.topics = frozenset((settings.topic_events, settings.topic_control))
        self.ledger = OffsetLedger()
        self.to_assign: set = set()

    def install(self) -> None:
        """Call before the worker starts consuming."""
        consumer = self.app.consumer
        consumer._read_offset = BlindReadOffsets(self.topics, consumer._read_offset)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)

    async def _on_assigned(self, app, assigned, **kwargs) -> None:
        # The committed offsets are read later, from the commit timer: asking the consumer
        # thread from inside its rebalance callback could wait on itself.
        self.to_assign = {tp for tp in assigned if tp.topic in self.topics}

    async def _on_revoked(self, app, revoked, **kwargs) -> None:
        self.to_assign -= set(revoked)
        self.ledger.revoke(tp for tp in revoked if tp.topic in self.topics)

    def fresh(self, events: list) -> list:
        """`events` without redeliveries of records already processed (or twice in the batch)."""
        out, batch = [], set()
        for fe in events:
            key = (fe.message.tp, fe.message.offset)
            if key not in batch and not self.ledger.seen(*key):
                batch.add(key)
                out.append(fe)
        return out

    def sent(self, faust_event, futures=()) -> None:
        msg = faust_event.message
        self.ledger.sent(msg.tp, msg.offset, futures)

    def absorb_skipped(self) -> None:
        """The input offsets the fetch stepped over hold nothing to process: done."""
        now = time.monotonic()
        for tp, start, end in skipped_offsets.drain():
            if tp.topic in self.topics:
                self.ledger.no_record(TP(tp.topic, tp.partition), start, end, now)

    async def commit(self) -> None:
        self.absorb_skipped()
        if self.to_assign:
            await self._assign(self.to_assign)
        await self.app.producer.flush()  # outputs of processed records reach the broker
        now = time.monotonic()
        self.ledger.settle(now)
        consumer = self.app.consumer
        offsets = self.ledger.due(tp for tp in consumer.assignment() if tp.topic in self.topics)
        if offsets and await consumer._commit(offsets):
            self.ledger.committed(offsets)
        holes = self.ledger.holes(now, self.settings.hole_check_s)
        if holes:
            await self._resolve(holes)

    async def _assign(self, tps: set) -> None:
        thread = self.app.consumer._thread
        aio = thread._ensure_consumer()
        now = time.monotonic()
        for tp in list(tps):
            committed = await thread.call_thread(aio.committed, ensure_aiokafka_TP(tp))
            if committed is None:  # no commit yet: the log start (auto_offset_reset=earliest)
                committed = (await self.app.consumer.earliest_offsets(tp)).get(tp, 0)
            if tp in self.to_assign:  # not revoked meanwhile
                self.ledger.assign(tp, committed, now)
                self.to_assign.discard(tp)

    async def _resolve(self, holes: dict) -> None:
        for tp, (start, end) in holes.items():
            present = await asyncio.to_thread(self._offsets_in_log, tp, start, end)
            missing = [o for o in range(start, end) if o not in present]
            self.ledger.mark_done(tp, missing, time.monotonic())
            if self.ledger.seen(tp, start):
                log.info("offsets %d..%d of %s hold no record: skipped", start, end, tp)
            else:
                log.warning("record %s@%d was never delivered: fetching again from there",
                            tp, start)
                await self.app.consumer.seek(tp, start)
                self.ledger.defer_hole(tp, time.monotonic())

    def _offsets_in_log(self, tp, start: int, end: int) -> set[int]:
        """The offsets in [start, end) that hold a record a consumer can read."""
        from confluent_kafka import TopicPartition

        cons = kafka_clients.consumer(self.settings, resolve_kafka(self.settings),
                                      f"{self.settings.app_id}-holes",
                                      **{"isolation.level": self.isolation})
        present, deadline = set(), time.monotonic() + 10.0
        try:
            cons.assign([TopicPartition(tp.topic, tp.partition, start)])
            while time.monotonic() < deadline:
                msg = cons.poll(0.5)
                if msg is None or msg.error():
                    continue
                if msg.offset() >= end:
                    return present
                present.add(msg.offset())
        finally:
            cons.close()
        return set(range(start, end))  # not sure: count every offset as present (refetch)
