"""Exactly-once (PROCESSING_GUARANTEE=exactly_once): one Kafka transaction per input partition
and TRANSACTION_COMMIT_MS (0: per micro-batch), holding everything its batches wrote for that
partition — recommendations, dead letters, re-routed forgets, state changelog records — and the
partition's input offsets (`send_offsets_to_transaction` with the group), committed together
or not at all.

- One transactional aiokafka producer per input partition, transactional id
  `{APP_ID}-eos-{partition}`. Starting one (`init_transactions`, which `begin_transaction`
  waits for) fences the previous owner's producer, a zombie's included, and ends its open
  transaction; the group's committed offsets are read only after that, so they are stable.
- The consumer reads `read_committed` (Faust's exactly_once consumer), so a state table is
  restored only from committed changelog records and an aborted batch leaves no trace in it.
- What the worker's memory changed in a transaction that did not commit is put back
  (`StateTable.begin_journal`, `rollback`) before the batch is tried again; Redis writes are
  idempotent by the event's place in the user's history, so a retried transaction appends
  nothing twice.

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

from streams import metrics
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

    def find(self, partition: int) -> AIOKafkaProducer | None:
        """The partition's producer, None if none is started (not claimed, or stopped)."""
        return self.producers.get(partition)

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


def offsets_by_tp(events: Sequence) -> dict:
    """Each input topic-partition's offsets among `events`."""
    out: dict = {}
    for fe in events:
        out.setdefault(fe.message.tp, []).append(fe.message.offset)
    return out


class TransactionalCommitter(Committer):
    """The input offsets of exactly-once: committed inside each batch's transaction.

    Keeps the at-least-once committer's ledger (which records were processed, redeliveries
    skipped, holes in the log looked up) but commits nothing on its timer."""

    isolation = "read_committed"

    def __init__(self, app, settings: Settings, producers: PartitionProducers) -> None:
        super().__init__(app, settings)
        self.producers = producers
        self.to_renew: set[int] = set()
        # one claim at a time: the agent's batch and the roll timer (`write_apart`) both claim,
        # and two renewals of one partition fence the producer the first one made
        self._claiming = asyncio.Lock()
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
        self.absorb_skipped()
        holes = self.ledger.holes(time.monotonic(), self.settings.hole_check_s)
        if holes:
            await self._resolve(holes)

    async def claim(self, partitions: set[int]) -> set[int]:
        """The partitions among `partitions` this worker owns, each with a fresh producer (on
        a new assignment) and its committed offsets read after the fencing."""
        async with self._claiming:
            return await self._claim(partitions)

    async def _claim(self, partitions: set[int]) -> set[int]:
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
        self.absorb_skipped()
        offsets = offsets_by_tp(events)
        out = {}
        for tp in self.app.consumer.assignment():
            if tp.partition == partition and tp.topic in self.topics:
                frontier = self.ledger.frontier_with(tp, offsets.get(tp, ()))
                if frontier is not None:
                    out[TopicPartition(tp.topic, tp.partition)] = frontier
        return out

    def lag(self, events: Sequence) -> int:
        """How many records the log holds beyond `events` in their partitions, as far as
        the consumer's last fetch knows (the most over the partitions)."""
        behind = 0
        for tp, offsets in offsets_by_tp(events).items():
            try:
                highwater = self.app.consumer.highwater(tp)
            except Exception:  # revoked meanwhile: nothing to wait for there
                continue
            if highwater is not None:
                behind = max(behind, highwater - max(offsets) - 1)
        return behind

    def done(self, events: Sequence, offsets: dict) -> None:
        """The transaction holding `events` committed `offsets`."""
        now = time.monotonic()
        for tp, done in offsets_by_tp(events).items():
            self.ledger.mark_done(tp, done, now)
        # aiokafka's TopicPartition and Faust's TP are both (topic, partition) tuples
        self.ledger.committed({tp: o for tp, o in offsets.items() if tp in self.ledger.parts})


class TransactionalBatches:
    """Runs micro-batches inside one transaction per input partition, retried whole and
    committed after a batch that leaves less than a full batch (BATCH_SIZE) behind it in the
    log, or else TRANSACTION_COMMIT_MS after the transaction began (0: after each batch).

    Under a backlog the transactions span the interval, and the worker pays for a commit
    once per interval, not per batch. A worker that keeps up commits each batch at once, so
    the interval adds no latency to a stream that is not backlogged.

    While a transaction is open, batches follow each other as in at-least-once (batch k is
    scored while k+1 is prepared); a commit first lets the batch in flight publish. The agent
    `bind`s its pipeline's callables; `run` takes one batch. A task commits a transaction that
    came due with no batch to carry it, a revoke and a stop commit at once (`commit_open`).
    """

    def __init__(self, committer: TransactionalCommitter, commit_interval_s: float = 0.0,
                 backlog: int = 1) -> None:
        self.committer, self.producers = committer, committer.producers
        self.group_id = committer.settings.app_id
        self.commit_interval_s = commit_interval_s
        self.backlog = backlog  # BATCH_SIZE: this many records behind a batch: a backlog
        self.state_table = None  # the StateTable whose changes a failed transaction puts back
        # per partition: the records processed in its open transaction, oldest first; the
        # offsets last added to it and the requests adding them
        self.taken: dict[int, list] = {}
        self.offsets: dict[int, dict] = {}
        self.adding: dict[int, list[asyncio.Future]] = {}
        self.open: set[int] = set()  # partitions whose transaction has begun, not yet ended
        self.opened_at = 0.0
        self.batches_held = 0  # batches processed into the open transactions
        self.busy = False  # inside run: a batch taken and not yet handed on
        self.lock = asyncio.Lock()  # one of run, the due commit, a revoke or a stop at a time
        self._closer: asyncio.Future | None = None  # the due commit's task
        # a commit that failed for good outside `run`: no batch may follow it (its records'
        # outputs would commit while the failed ones' offsets stay behind: duplicates later)
        self.fault: BaseException | None = None
        self.bind(_unbound)
        committer.before_revoke = self.commit_open

    def bind(self, process: Callable[[Sequence], Awaitable[bool]],
             isolated: Callable[..., Awaitable[bool]] | None = None,
             flush: Callable[[], Awaitable[None]] | None = None,
             abandon: Callable[[], Awaitable[None]] | None = None,
             on_fault: Callable[[BaseException], None] | None = None) -> None:
        """`process(events)` takes a batch (False: it left them unprocessed, a stop);
        `isolated(events, exc=…)` takes it record by record; `flush()` returns once the batch
        in flight is published (raising its error), `abandon()` once it ended either way;
        `on_fault` hears of a commit that failed for good outside `run`."""
        self.process, self.isolated = process, isolated
        self.flush, self.abandon = flush or _nothing, abandon or _nothing
        self.on_fault = on_fault

    async def send(self, source_partition: int, topic: str, key: bytes | None,
                   value: bytes | None, partition: int | None = None, headers=None):
        """Queue one record in the transaction of the input partition it comes from."""
        return await self.producers.get(source_partition).send(
            topic, value, key=key, partition=partition, headers=headers)

    async def send_changelog(self, topic: str, key: bytes, value: bytes | None,
                             partition: int):
        """A state record: its changelog partition is its event's input partition."""
        return await self.send(partition, topic, key, value, partition)

    async def run(self, events: Sequence) -> None:
        """Process `events` in their partitions' open transactions (begun if none is), and
        commit them if due or if the worker has caught up. Claiming the partitions (which
        may wait on the consumer thread, busy with a rebalance that waits for `commit_open`)
        is done before the lock."""
        self.busy, caught_up = True, self.committer.lag(events) < self.backlog
        try:
            ours = await self.committer.claim({fe.message.partition for fe in events})
            async with self.lock:
                if self.fault is not None:  # a due commit failed for good: take nothing
                    raise self.fault
                taken = {(fe.message.tp, fe.message.offset) for fe in self._held()}
                events = self.committer.fresh([
                    fe for fe in events if fe.message.partition in ours
                    and (fe.message.tp, fe.message.offset) not in taken])
                if events:
                    await self._take(events, self.process, self.isolated)
                if self.open and (caught_up or self._due()):
                    await self._commit_taken()
                elif self.open:
                    self._close_later()
        finally:
            self.busy = False

    def _failed(self, exc: Exception) -> None:
        """The due commit failed for good: no batch is taken after it (the next `run` raises
        it), and `on_fault` hears of it at once."""
        self.fault = exc
        if self.on_fault is not None:
            self.on_fault(exc)

    async def commit_open(self, timeout_s: float) -> None:
        """Commit the open transactions now (a revoke, a stop), waiting at most `timeout_s`
        for the batch that holds them. Not for a batch still claiming its partitions: it has
        not taken the lock, and it may be waiting on the consumer thread, itself in the
        rebalance that waits for this."""
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("the open transactions of partitions %s were not committed within "
                        "%.0f s", sorted(self.open), timeout_s)
            return
        try:
            if self.open:
                await self._commit_taken()
        finally:
            self.lock.release()

    async def write_apart(self, partitions: set[int],
                          write: Callable[[int], Awaitable[None]]) -> None:
        """`write(p)` sends records of no input record (a timer's) in each of `partitions`
        this worker owns: into its open transaction if it has one, else in a transaction of
        their own, committed at once without offsets. A fenced partition is left to its new
        owner, a failed one aborted (the caller tries again later)."""
        ours = await self.committer.claim(partitions)
        async with self.lock:
            if self.fault is not None:
                return
            for p in sorted(ours):
                producer = self.producers.find(p)
                if producer is None:  # stopped meanwhile
                    continue
                if p in self.open:  # commits with what that transaction holds
                    await write(p)
                    continue
                try:
                    await producer.begin_transaction()
                    await write(p)
                    await producer.commit_transaction()
                except ProducerFenced:
                    log.warning("partition %d was fenced: left to its new owner", p)
                    self.committer.to_renew.add(p)
                except Exception as exc:  # nothing may stay open: the next batch begins one
                    log.warning("a transaction of partition %d's own records failed: %r", p, exc)
                    await self._abort(p)

    async def idle(self, timeout_s: float) -> None:
        """Wait until the batch taken is handed on (a stop)."""
        await wait_while(lambda: self.busy, timeout_s)

    async def stop(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
        await self.producers.stop_all()

    def _due(self) -> bool:
        return time.monotonic() - self.opened_at >= self.commit_interval_s

    def _close_later(self) -> None:
        if self._closer is None or self._closer.done():
            self._closer = asyncio.ensure_future(self._commit_when_due())

    async def _commit_when_due(self) -> None:
        """Commit the open transactions when due, if no batch has done it by then."""
        while self.open:
            await asyncio.sleep(max(0.0, self.opened_at + self.commit_interval_s
                                    - time.monotonic()))
            async with self.lock:
                if not (self.open and self._due()):
                    continue
                try:
                    await self._commit_taken()
                except Exception as exc:
                    self._failed(exc)
                    return

    async def _take(self, events: list, process, isolated) -> None:
        """Process `events` in the open transactions; on a failure abort them all, put the
        memory back and process everything they held again (record by record after an error
        of the processing itself), MAX_ATTEMPTS times in all."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await self._begin({fe.message.partition for fe in events})
                processed = await process(events)
            except KafkaError as exc:  # a send failed: everything open is tried again
                log.warning("a send failed (%r): the open transactions are aborted and their "
                            "records processed again (attempt %d of %d)", exc, attempt,
                            MAX_ATTEMPTS)
                events = await self._abort_taken(events)
                continue
            except Exception as exc:
                events = await self._abort_taken(events)
                if isolated is None:
                    raise
                log.warning("a batch of %d records failed (%s: %s): tried again record by "
                            "record", len(events), type(exc).__name__, exc)
                process, isolated = partial(isolated, exc=exc), None
                continue
            except BaseException:
                await self._abort_taken(events)
                raise
            if processed:  # False: a stop came first; the next owner processes them
                for fe in events:
                    self.taken.setdefault(fe.message.partition, []).append(fe)
                self._add_offsets({fe.message.partition for fe in events})
                self.batches_held += 1
            return
        await self._abort_taken(events)
        raise KafkaError(f"{MAX_ATTEMPTS} transactions in a row failed for partitions "
                         f"{sorted({fe.message.partition for fe in events})}")

    def _held(self) -> list:
        return [fe for p in sorted(self.taken) for fe in self.taken[p]]

    def _add_offsets(self, partitions: set[int]) -> None:
        """Add each partition's offsets, as far as its transaction now holds, while the next
        batch is processed (the broker keeps the last offsets added to a transaction)."""
        for p in partitions:
            offsets = self.committer.offsets(p, self.taken[p])
            if offsets:
                self.offsets[p] = offsets
                self.adding.setdefault(p, []).append(asyncio.ensure_future(
                    self.producers.get(p).send_offsets_to_transaction(offsets, self.group_id)))

    async def _begin(self, partitions: set[int]) -> None:
        if not self.open:
            self.state_table.begin_journal()
            self.opened_at = time.monotonic()
        for p in sorted(partitions - self.open):
            await self.producers.get(p).begin_transaction()
            self.open.add(p)

    async def _commit_taken(self) -> None:
        """Commit each open partition's transaction with the offsets of what it holds. A
        partition whose commit fails is aborted, its memory put back and its records
        processed again in a new transaction; a fenced one is left to its new owner."""
        started = time.monotonic()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await self.flush()  # the batch in flight publishes into the transactions
            except Exception as exc:
                events = await self._abort_taken([])
                process = self.process if isinstance(exc, KafkaError) or self.isolated is None \
                    else partial(self.isolated, exc=exc)
                await self._take(events, process, None)
                continue
            partitions = sorted(self.open)
            results = await asyncio.gather(*(self._commit(p) for p in partitions),
                                           return_exceptions=True)
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
            metrics.TRANSACTION_BATCHES.observe(self.batches_held)
            metrics.TRANSACTION_COMMIT_SECONDS.observe(time.monotonic() - started)
            empty = {p for p in partitions if not self.taken.get(p)}  # aborted: nothing held
            self.state_table.rollback(failed | fenced | empty)
            self.state_table.end_journal()
            again = [fe for p in sorted(failed) for fe in self.taken.get(p, ())]
            self._clear()
            if not again:
                return
            log.warning("transactions of partitions %s aborted (attempt %d of %d): their %d "
                        "records are processed again", sorted(failed), attempt, MAX_ATTEMPTS,
                        len(again))
            await self._take(again, self.process, self.isolated)
        partitions = sorted(self.open)
        await self._abort_taken([])
        raise KafkaError(f"{MAX_ATTEMPTS} transactions in a row failed for partitions "
                         f"{partitions}")

    async def _commit(self, partition: int) -> None:
        """One partition's transaction, once its offsets are added: committed, or aborted if
        it holds no processed record."""
        producer, events = self.producers.get(partition), self.taken.get(partition, [])
        for result in await asyncio.gather(*self.adding.get(partition, ()),
                                           return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
        if not events:
            await producer.abort_transaction()
            return
        await producer.commit_transaction()
        self.committer.done(events, self.offsets.get(partition, {}))

    def _clear(self) -> None:
        self.taken, self.offsets, self.adding, self.open = {}, {}, {}, set()
        self.batches_held = 0

    async def _abort_taken(self, events: list) -> list:
        """Abort the open transactions and put the memory back; returns the records they
        held followed by `events`, to be processed again."""
        await self.abandon()  # the batch in flight ends (its error is the one being handled)
        await asyncio.gather(*(f for fs in self.adding.values() for f in fs),
                             return_exceptions=True)
        await asyncio.gather(*(self._abort(p) for p in sorted(self.open)))
        self.state_table.rollback(set(self.open))
        self.state_table.end_journal()
        held = self._held()
        keys = {(fe.message.tp, fe.message.offset) for fe in held}
        again = held + [fe for fe in events if (fe.message.tp, fe.message.offset) not in keys]
        self._clear()
        return again

    async def _abort(self, partition: int) -> None:
        metrics.TRANSACTIONS_ABORTED.inc()
        try:
            await self.producers.get(partition).abort_transaction()
        except Exception as exc:  # fenced or broken: a new producer is made on the next claim
            log.warning("abort of partition %d failed (%r): its producer is renewed",
                        partition, exc)
            self.committer.to_renew.add(partition)


async def _nothing() -> None:
    """No batch in flight to wait for."""


async def _unbound(events: Sequence) -> bool:
    raise RuntimeError("TransactionalBatches.bind was not called: no pipeline to process with")
