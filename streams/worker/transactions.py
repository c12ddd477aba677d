"""Exactly-once (PROCESSING_GUARANTEE=exactly_once): one Kafka transaction per input partition
and micro-batch, holding everything the batch wrote for that partition — recommendations, dead
letters, re-routed forgets, state changelog records — and the partition's input offsets
(`send_offsets_to_transaction` with the group), committed together or not at all.

- One transactional aiokafka producer per input partition, transactional id
  `{APP_ID}-eos-{partition}`. Starting one (`init_transactions`, which `begin_transaction`
  waits for) fences the previous owner's producer, a zombie's included, and ends its open
  transaction; the group's committed offsets are read only after that, so they are stable.
- The consumer reads `read_committed` (Faust's exactly_once consumer), so a state table is
  restored only from committed changelog records and an aborted batch leaves no trace in it.
- What the worker's memory changed in a batch that did not commit is put back
  (`StateTable.begin_journal`, `rollback`) before the batch is tried again; Redis writes are
  idempotent by the event's place in the user's history, so a retried batch appends nothing
  twice.

Faust's own transactions (its timer commits every `COMMIT_INTERVAL_S` of whatever its acks
reached, not aligned with the agent's batches) are bypassed: the input topics are declared
without acks, so Faust commits none of their offsets, no record goes through Faust's
producer, and Faust's per-partition transactional producers are not started.
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from streams.config import Settings
from streams.errors import InterestStreamError
from streams.local.endpoints import resolve_kafka
from streams.worker.committer import Committer

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a batch whose transaction fails this often in a row stops the worker
# aiokafka retries a transactional request after retry_backoff_ms (100 by default), and a
# transaction begun while the previous one's markers are still being written is answered
# "concurrent transactions" (KAFKA-5477): back to back, commits took 20-70 ms (p90 ~110 ms)
# in the bench with 100 ms, 6-20 ms with 10.
RETRY_BACKOFF_MS = 10
REVOKE_WAIT_S = 20.0  # under the group's rebalance timeout (30 s, streams.worker.app)


async def wait_while(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class TransactionsUnavailable(InterestStreamError):
    """The broker would not start a transaction: exactly-once cannot run."""


class PartitionProducers:
    """One started transactional producer per input partition."""

    def __init__(self, settings: Settings, app) -> None:
        self.settings, self.app = settings, app
        self.producers: dict[int, AIOKafkaProducer] = {}

    def transactional_id(self, partition: int | str) -> str:
        return f"{self.settings.app_id}-eos-{partition}"

    def get(self, partition: int) -> AIOKafkaProducer:
        return self.producers[partition]

    async def renew(self, partition: int) -> None:
        """A new producer for `partition`: fences every earlier one with its id (ours or a
        previous owner's) and ends its open transaction."""
        await self.drop(partition)
        self.producers[partition] = await self._start(self.transactional_id(partition))

    async def probe(self) -> None:
        """Start and stop one transactional producer: a broker that cannot run transactions
        is reported when the worker starts, not at its first event."""
        await (await self._start(self.transactional_id("probe"))).stop()

    async def _start(self, tid: str) -> AIOKafkaProducer:
        """A started producer with transactional id `tid`, its `init_transactions` done."""
        bootstrap, conf = resolve_kafka(self.settings), self.app.conf
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id=tid, transactional_id=tid,
            linger_ms=1, max_batch_size=256 * 1024,  # as the app's producer (streams.worker.app)
            retry_backoff_ms=RETRY_BACKOFF_MS,
            **credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context))
        timeout = self.settings.transaction_init_timeout_s
        try:
            await asyncio.wait_for(self._init(producer), timeout)
        except (asyncio.TimeoutError, KafkaError) as exc:
            await producer.stop()
            reason = (f"no answer within {timeout:.0f} s" if isinstance(exc, asyncio.TimeoutError)
                      else f"{type(exc).__name__}: {exc}")
            raise TransactionsUnavailable(
                f"PROCESSING_GUARANTEE=exactly_once needs Kafka transactions, and the broker at "
                f"{bootstrap} did not start one for transactional id {tid!r} ({reason}): "
                "check that its transaction state log can be created (transaction.state.log."
                "replication.factor and min.isr at most the live brokers) and that this client "
                "may use transactional ids, or set PROCESSING_GUARANTEE=at_least_once") from exc
        return producer

    @staticmethod
    async def _init(producer: AIOKafkaProducer) -> None:
        await producer.start()
        await producer.begin_transaction()  # waits for init_transactions (the fencing)
        await producer.abort_transaction()  # empty: ends at once, nothing reaches the broker

    async def drop(self, partition: int) -> None:
        producer = self.producers.pop(partition, None)
        if producer is not None:
            try:
                await producer.stop()
            except Exception as exc:  # a fenced or broken producer: nothing left to lose
                log.debug("stopping the producer of partition %d: %r", partition, exc)

    async def stop_all(self) -> None:
        for partition in list(self.producers):
            await self.drop(partition)


async def _no_producers_of_faust(assigned, revoked, newly_assigned) -> None:
    """Replaces `TransactionManager.on_rebalance` (`TransactionalCommitter.install`)."""


def check_transactions(settings: Settings, app) -> None:
    """Raise TransactionsUnavailable, with the reason, unless the broker starts a
    transaction within TRANSACTION_INIT_TIMEOUT_S (`python -m streams worker` asks first)."""
    asyncio.run(PartitionProducers(settings, app).probe())


class TransactionalCommitter(Committer):
    """The input offsets of exactly-once: committed inside each batch's transaction.

    Keeps the at-least-once committer's ledger (which records were processed, redeliveries
    skipped, holes in the log looked up) but commits nothing on its timer."""

    isolation = "read_committed"

    def __init__(self, app, settings: Settings, producers: PartitionProducers) -> None:
        super().__init__(app, settings)
        self.producers = producers
        self.to_renew: set[int] = set()
        # awaited when partitions are revoked: the batch in progress ends its transactions
        self.before_revoke: Callable[[float], Awaitable[None]] | None = None

    def install(self) -> None:
        super().install()
        # Faust's exactly_once starts (and on a revoke stops) its own transactional producer
        # per assigned partition inside the rebalance; nothing is sent through them here, and
        # on a broker without transactions their start blocked the rebalance for good.
        self.app.consumer.transactions.on_rebalance = _no_producers_of_faust

    async def _on_assigned(self, app, assigned, **kwargs) -> None:
        await super()._on_assigned(app, assigned, **kwargs)
        self.to_renew |= {tp.partition for tp in self.to_assign}

    async def _on_revoked(self, app, revoked, **kwargs) -> None:
        """Let the batch in progress commit before the rebalance goes on. The recovery that
        follows re-reads the changelog up to its last stable offset and applies it over the
        table's memory: a transaction still open then would have its newer states overwritten
        by older committed ones (events lost from the state, seen in the fault suite)."""
        if self.before_revoke is not None:
            await self.before_revoke(REVOKE_WAIT_S)
        await super()._on_revoked(app, revoked, **kwargs)

    def sent(self, faust_event, futures=()) -> None:
        """Nothing to track: a record is done when its batch's transaction commits."""

    async def commit(self) -> None:
        """The timer's part: look up holes; offsets go only through transactions."""
        holes = self.ledger.holes(time.monotonic(), self.settings.hole_check_s)
        if holes:
            await self._resolve(holes)

    async def claim(self, partitions: set[int]) -> set[int]:
        """The partitions among `partitions` this worker owns, each with a fresh producer (on
        a new assignment) and its committed offsets read after the fencing."""
        assignment = self.app.consumer.assignment()
        ours = set()
        for partition in sorted(partitions):
            tps = {tp for tp in assignment if tp.partition == partition and tp.topic in self.topics}
            if not any(tp.topic == self.settings.topic_events for tp in tps):
                continue  # revoked meanwhile: its new owner processes these records
            if partition in self.to_renew or partition not in self.producers.producers:
                await self.producers.renew(partition)
                self.to_renew.discard(partition)
            pending = {tp for tp in tps if tp in self.to_assign}
            if pending:
                await self._assign(pending)
            ours.add(partition)
        return ours

    def offsets(self, partition: int, events: Sequence) -> dict:
        """The offsets to commit for `partition` once `events` (its records in this batch) are
        done: each input topic's frontier (a hole resolved since the last batch included)."""
        offsets: dict = {}
        for fe in events:
            offsets.setdefault(fe.message.tp, []).append(fe.message.offset)
        out = {}
        for tp in self.app.consumer.assignment():
            if tp.partition == partition and tp.topic in self.topics:
                frontier = self.ledger.frontier_with(tp, offsets.get(tp, ()))
                if frontier is not None:
                    out[TopicPartition(tp.topic, tp.partition)] = frontier
        return out

    def done(self, events: Sequence, offsets: dict) -> None:
        """The transaction holding `events` committed `offsets`."""
        now = time.monotonic()
        by_tp: dict = {}
        for fe in events:
            by_tp.setdefault(fe.message.tp, []).append(fe.message.offset)
        for tp, done in by_tp.items():
            self.ledger.mark_done(tp, done, now)
        # aiokafka's TopicPartition and Faust's TP are both (topic, partition) tuples
        self.ledger.committed({tp: o for tp, o in offsets.items() if tp in self.ledger.parts})


class TransactionalBatches:
    """Runs each micro-batch inside one transaction per input partition, retried whole."""

    def __init__(self, committer: TransactionalCommitter) -> None:
        self.committer, self.producers = committer, committer.producers
        self.group_id = committer.settings.app_id
        self.state_table = None  # the StateTable whose changes a failed transaction puts back
        self.busy = False  # inside run: a batch taken, its transactions not yet ended
        self.open = False  # inside _attempt: transactions begun and not yet ended
        committer.before_revoke = self.transactions_ended

    async def send(self, source_partition: int, topic: str, key: bytes | None,
                   value: bytes | None, partition: int | None = None, headers=None):
        """Queue one record in the transaction of the input partition it comes from."""
        return await self.producers.get(source_partition).send(
            topic, value, key=key, partition=partition, headers=headers)

    async def send_changelog(self, topic: str, key: bytes, value: bytes | None,
                             partition: int):
        """A state record: its changelog partition is its event's input partition."""
        return await self.send(partition, topic, key, value, partition)

    async def run(self, events: Sequence, process: Callable[[Sequence], Awaitable[bool]],
                  isolated: Callable[[Sequence, Exception], Awaitable[bool]] | None = None
                  ) -> None:
        """Process `events` (`process` returns False when it left them unprocessed) and commit
        them with their offsets, one transaction per input partition. A partition whose
        transaction fails is put back and tried again, MAX_ATTEMPTS times in all; a batch
        whose processing raised (not a send) is tried again with `isolated`, record by
        record."""
        self.busy = True
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                ours = await self.committer.claim({fe.message.partition for fe in events})
                events = self.committer.fresh([fe for fe in events
                                               if fe.message.partition in ours])
                if not events:
                    return
                try:
                    failed = await self._attempt(events, process)
                except Exception as exc:
                    if isolated is None:
                        raise
                    log.warning("a batch of %d records failed (%s: %s): tried again record by "
                                "record", len(events), type(exc).__name__, exc)
                    process, isolated = partial(isolated, exc=exc), None
                    continue
                if not failed:
                    return
                events = [fe for fe in events if fe.message.partition in failed]
                log.warning("transactions of partitions %s aborted (attempt %d of %d): their %d "
                            "records are processed again", sorted(failed), attempt,
                            MAX_ATTEMPTS, len(events))
            raise KafkaError(f"{MAX_ATTEMPTS} transactions in a row failed for partitions "
                             f"{sorted({fe.message.partition for fe in events})}")
        finally:
            self.busy = False

    async def idle(self, timeout_s: float) -> None:
        """Wait until the batch taken is committed or aborted (a stop)."""
        await wait_while(lambda: self.busy, timeout_s)

    async def transactions_ended(self, timeout_s: float) -> None:
        """Wait until no transaction is open (a revoke). Not `idle`: a batch still claiming
        its partitions asks the consumer thread for committed offsets, and that thread is
        inside the rebalance waiting for this; it has opened no transaction yet."""
        await wait_while(lambda: self.open, timeout_s)

    async def stop(self) -> None:
        await self.producers.stop_all()

    async def _attempt(self, events: Sequence, process) -> set[int]:
        """Process `events` once; returns the partitions whose transaction did not commit
        (their state changes are put back)."""
        by_partition: dict[int, list] = {}
        for fe in events:
            by_partition.setdefault(fe.message.partition, []).append(fe)
        partitions = sorted(by_partition)
        offsets = {p: self.committer.offsets(p, by_partition[p]) for p in partitions}
        self.state_table.begin_journal()
        adding: list = []
        self.open = True
        try:
            try:
                for p in partitions:
                    await self.producers.get(p).begin_transaction()
                # the offsets reach the coordinators while the batch is processed
                adding = [asyncio.ensure_future(self._add_offsets(p, offsets[p]))
                          for p in partitions]
                processed = await process(events)
                await asyncio.gather(*adding)
            except KafkaError as exc:  # a send failed: the whole batch is tried again
                log.warning("a send failed (%r): the batch's transactions are aborted", exc)
                await self._abort_all(partitions, adding)
                return set(partitions)
            except BaseException:
                await self._abort_all(partitions, adding)
                raise
            if not processed:  # a stop came first: leave the batch to the next owner
                await self._abort_all(partitions, adding)
                return set()
            results = await asyncio.gather(*(self._commit(p, by_partition[p], offsets[p])
                                             for p in partitions), return_exceptions=True)
            failed, fenced = set(), set()
            for p, result in zip(partitions, results):
                if isinstance(result, ProducerFenced):
                    # another worker made a producer with this id: the partition is its now
                    # (not tried again here; renewed before this worker uses it again)
                    log.warning("partition %d was fenced: left to its new owner", p)
                    fenced.add(p)
                    self.committer.to_renew.add(p)
                elif isinstance(result, BaseException):
                    log.warning("commit of partition %d failed: %r", p, result)
                    failed.add(p)
                    await self._abort(p)
            self.state_table.rollback(failed | fenced)
            return failed
        finally:
            self.open = False
            self.state_table.end_journal()

    async def _add_offsets(self, partition: int, offsets: dict) -> None:
        if offsets:
            await self.producers.get(partition).send_offsets_to_transaction(offsets,
                                                                           self.group_id)

    async def _commit(self, partition: int, events: list, offsets: dict) -> None:
        await self.producers.get(partition).commit_transaction()
        self.committer.done(events, offsets)

    async def _abort_all(self, partitions: list[int], adding: list) -> None:
        """Abort the batch's transactions (once their offsets are added or failed) and put
        the memory back."""
        await asyncio.gather(*adding, return_exceptions=True)
        await asyncio.gather(*(self._abort(p) for p in partitions))
        self.state_table.rollback(set(partitions))

    async def _abort(self, partition: int) -> None:
        try:
            await self.producers.get(partition).abort_transaction()
        except Exception as exc:  # fenced or broken: a new producer is made on the next claim
            log.warning("abort of partition %d failed (%r): its producer is renewed",
                        partition, exc)
            self.committer.to_renew.add(partition)
