"""The agent: wires the pure pieces (events, state, inference) to Kafka and Redis.

One micro-batch (bounded by BATCH_SIZE and BATCH_WITHIN_S):
  1. validate every record (content, then key and partition); bad ones go to the DLQ with
     reason and original bytes;
  2. update each user's short-term state in the table (redeliveries change nothing);
  3. one pipelined Redis round trip: append histories, mark dirty, read long-term vectors;
  4. one GPT call and one fusion call for the whole batch (per A/B arm in it), in the
     inference thread, while the event loop already prepares the next batch (steps 1-3);
  5. one recommendation per valid event on `recommendations`, in input order.

Control records (privacy erasures) come from the control topic, in the same stream: a batch is
split at each one. A batch whose processing raises is processed again record by record; a
record that fails twice alone is dead-lettered (`processing_failed`); MAX_CONSECUTIVE_FAILURES
such records in a row, or any error outside that, stop the worker with a non-zero exit.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import orjson
from aiokafka.errors import KafkaError

from streams import metrics
from streams.bundle import MASKED_SCORE
from streams.events import (Event, Forget, Rejection, check_routing, decode_event,
                            dlq_headers, dlq_key, dlq_record, parse_control, partition_for)
from streams.inference import LongTermUpdate, RecommendationBatch, ScoringInputs
from streams.kafka.clients import changelog_roll_interval_s
from streams.longterm.store import HistoryAppend, LongTermVector, history_entry
from streams.state import history_place, last_event_ts, recent_items, update_short_term
from streams.worker.app import (app, control_topic, dlq_topic, input_topics, recommendations_topic,
                                send_raw, settings, settle_heap, short_term_table)
from streams.worker.committer import Committer
from streams.worker.health import Health
from streams.worker.online_arms import ArmOnlineMetrics
from streams.worker.recovery_watch import RecoveryWatch
from streams.worker.serving import Runtime, Serving
from streams.worker.state_table import StateTable
from streams.worker.transactions import (PartitionProducers, TransactionalBatches,
                                         TransactionalCommitter)

log = logging.getLogger(__name__)


_serving: Serving | None = None
transactional = settings.processing_guarantee == "exactly_once"
# At-least-once: input offsets are committed from what was processed and delivered, and the
# worker writes the state's changelog records itself, as its outputs. Exactly-once: offsets,
# outputs and changelog records go in one transaction per input partition, committed after
# each batch once the worker has caught up, and every TRANSACTION_COMMIT_MS under a backlog.
if transactional:
    committer: Committer = TransactionalCommitter(app, settings, PartitionProducers(settings, app))
    batches: TransactionalBatches | None = TransactionalBatches(
        committer, settings.transaction_commit_ms / 1000, settings.batch_size)
    state_table = StateTable(short_term_table, send=batches.send_changelog)
    batches.state_table = state_table
else:
    committer, batches = Committer(app, settings), None
    state_table = StateTable(short_term_table, send=partial(send_raw, app))
app.before_start.append(committer.install)
health = Health()
online = ArmOnlineMetrics(settings.top_k)  # with arms: each arm's online HR and NDCG
# Crashed: the worker leaves its group this long after /healthz started failing.
CRASH_EXIT_DELAY_S = 1.0
EXIT_CRASHED = 70  # EX_SOFTWARE: `python -m streams worker`'s exit code after a crash


async def send_output(topic, faust_event, key: bytes | None, value: bytes,
                      partition: int | None = None, headers=None):
    """Queue one output record; returns its delivery future. At-least-once: straight to the
    producer (the committer waits on its futures). Exactly-once: in the transaction of the
    event's source partition."""
    if batches is not None:
        return await batches.send(faust_event.message.partition, topic.get_topic_name(), key,
                                  value, partition, headers)
    return await send_raw(app, topic.get_topic_name(), key, value, partition, headers)


async def dead_letter(faust_event, rejection: Rejection, now_ms: int) -> None:
    """Send the record to the DLQ with its reason (bounded in size whatever the input)."""
    msg = faust_event.message
    metrics.EVENTS_DLQ.labels(rejection.reason).inc()
    delivered_by(faust_event, await send_output(
        dlq_topic, faust_event, dlq_key(msg.key),
        dlq_record(rejection, faust_event.value, msg.topic, msg.partition, msg.offset, now_ms,
                   key=msg.key),
        headers=dlq_headers(msg.headers)))


def delivered_by(faust_event, *futures) -> None:
    """The record is processed; its offset may be committed once `futures` are delivered
    (at-least-once; exactly-once commits it with its batch's transaction)."""
    committer.sent(faust_event, futures)


def serving() -> Serving:
    global _serving
    if _serving is None:
        _serving = Serving(settings).load()
    return _serving


def runtime() -> Runtime:
    """The first runtime: the store, the settings and the inference thread all share."""
    return serving().primary


def switch_to_published_bundle() -> None:
    """Between two batches: serve a newly published bundle once it is loaded and checked (per
    arm). The batch in flight keeps the runtime it was prepared with."""
    serving().switch_to_published()


@dataclass
class Pending:
    """A valid event after its state update, waiting for inference."""

    faust_event: object  # the Kafka record it came from (its partition routes state and sends)
    event: Event
    rows: list[int]  # the user's recent item rows, oldest first
    dt_s: float  # seconds since the user's previous event
    is_new: bool  # False for a redelivered event: state and history left unchanged
    place: tuple[str, int]  # (lineage, position) in the user's long history
    items: Sequence[Sequence]  # the state's recent (item_id, ts, event_type), oldest first


def apply_state(valid: list[tuple[object, Event]], runtime_of) -> tuple[list[Pending], dict]:
    """Update each user's state for each valid event, in order; returns what to score and, per
    user whose state changed, (the event that last changed it, the new state). `runtime_of`
    gives the user's runtime, whose catalog maps the state's items to rows."""
    out, changed = [], {}
    for faust_event, event in valid:
        user = event.user_id
        row_of = runtime_of(user).bundle.items.row_of
        state = changed[user][1] if user in changed else state_table.get(user)
        previous_ts = last_event_ts(state)
        new_state, is_new = update_short_term(state, event, settings.short_term_len,
                                              settings.dedup_window)
        if is_new:
            changed[user] = (faust_event, new_state)
        else:
            metrics.DUPLICATES.inc()
        rows = list(map(row_of.get, recent_items(new_state)))
        if not all(rows):  # None: an item the bundle's catalog does not have (rows are >= 1)
            metrics.ITEMS_NOT_IN_CATALOG.inc(rows.count(None))
            rows = [r for r in rows if r]
        dt = (event.ts - previous_ts) / 1000.0 if previous_ts is not None else 0.0
        out.append(Pending(faust_event, event, rows, max(dt, 0.0), is_new,
                           history_place(new_state), new_state["items"]))
    return out, changed


def newer_events(lt: LongTermVector, p: Pending, rt: Runtime) -> LongTermUpdate | None:
    """What brings `lt` up to the event `p`: the state's events after the place the vector
    covers. None when it covers them already, belongs to another lineage, or is older than
    the state's memory (then it is served as refreshed)."""
    if lt.place is None or lt.place[0] != p.place[0]:
        return None
    newer = p.place[1] - lt.place[1]
    if newer <= 0 or newer > len(p.items):
        if newer > len(p.items):
            metrics.LONG_TERM_STALE.inc()
        return None
    row_of, weights = rt.bundle.items.row_of, rt.weights
    return LongTermUpdate(lt.pooled, lt.weight, [(row_of[item], weights.get(kind, 1.0))
                                                 for item, _, kind in p.items[-newer:]
                                                 if item in row_of])


def render_outputs(pending: Sequence[Pending], batch: RecommendationBatch, rt: Runtime,
                   long_vecs: dict, degraded: bool, now_ms: int) -> list[bytes]:
    """The `recommendations` messages of a batch (numbers rounded once, in numpy).

    Rounded in float64 before `tolist()`: a rounded float32 widened to a Python float prints
    all its binary digits (0.07897999882698059 for 0.07898), which nearly doubled the message.
    The interest vector stays float32 and orjson writes each row directly, shortest form.
    Rows the fusion masked (the user's recent items, padding) are left out: they come back only
    when fewer than k items are unseen, so a list may then be shorter than k."""
    ids, titles = rt.bundle.items.ids_by_row, rt.bundle.items.titles_by_row  # once a batch
    version, mode, arm = rt.bundle.version, rt.fusion_mode, rt.arm or None
    unranked = MASKED_SCORE / 2  # below it: a masked row
    interests = np.round(batch.fused.astype(np.float32, copy=False), 5)  # (B, D), C-contiguous
    raw = batch.scores.astype(np.float64)
    short = batch.short_term_parts(rt.recommender.item_emb).astype(np.float64)
    item_item = batch.item_item.astype(np.float64)
    scores = np.round(raw, 4).tolist()
    shorts = np.round(short, 4).tolist()
    items_parts = np.round(item_item, 4).tolist()
    # score = short + long + item_item, up to rounding
    longs = np.round(raw - short - item_item, 4).tolist()
    alphas = np.round(batch.alpha.astype(np.float64), 4).tolist()
    out = []
    for p, rows, row_scores, row_short, row_long, row_ii, interest, alpha in zip(
            pending, batch.rows.tolist(), scores, shorts, longs, items_parts, interests, alphas):
        event = p.event
        lt = long_vecs.get(event.user_id)
        out.append(orjson.dumps({
            "event_id": event.event_id,
            "user_id": event.user_id,
            "item_id": event.item_id,  # the event's item: what this recommendation follows
            "items": [{"item_id": ids[r], "score": sc, "short_term": st, "long_term": lg,
                       "item_item": ii, "title": titles[r]}
                      for r, sc, st, lg, ii in zip(rows, row_scores, row_short, row_long, row_ii)
                      if sc > unranked],
            "interest": interest,
            "alpha": alpha,
            "fusion_mode": mode,
            "arm": arm,
            "long_term": None if lt is None else {"version": lt.version, "model": lt.model,
                                                  "age_s": round(lt.age_s(now_ms), 3)},
            "degraded": degraded,
            "model_version": version,
            "event_ts": event.ts,
            "emitted_ts": now_ms,
        }, option=orjson.OPT_SERIALIZE_NUMPY))
    return out


def render_segment(prepared: Prepared, batches: list[RecommendationBatch], now_ms: int
                   ) -> list[bytes]:
    """Each group's messages, put back in the segment's order; with arms, each group's
    online metrics are counted too."""
    if len(prepared.groups) == 1 and not prepared.groups[0].rt.arm:
        return render_outputs(prepared.pending, batches[0], prepared.groups[0].rt,
                              prepared.long_vecs, prepared.degraded, now_ms)
    values: list = [None] * len(prepared.pending)
    for g, batch in zip(prepared.groups, batches):
        group = [prepared.pending[i] for i in g.at]
        rendered = render_outputs(group, batch, g.rt, prepared.long_vecs, prepared.degraded,
                                  now_ms)
        for i, value in zip(g.at, rendered):
            values[i] = value
        online.observe(g.rt.arm, group, batch, g.rt.bundle.items.ids_by_row)
    return values


@dataclass
class Prepared:
    """A segment after validation, state updates and the Redis round trip: ready to score."""

    pending: list[Pending]
    long_vecs: dict
    degraded: bool
    groups: list[ScoringGroup]  # one per arm in the segment (one without arms)


@dataclass
class ScoringGroup:
    """A segment's events of one runtime: it scores and renders them, even if a swap came in
    between. The inputs are built on the loop: the inference thread only runs onnxruntime."""

    rt: Runtime
    at: list[int]  # their places in the segment
    inputs: ScoringInputs


class BatchPipeline:
    """Scores batch k in the inference thread while batch k+1 is prepared on the event loop.

    onnxruntime releases the GIL, so the GPT and the fusion run on the second core while the
    loop decodes, updates state and talks to Redis. Outputs keep input order (a batch's sends
    wait for the previous batch's). A record's offset is committed only once its outputs are
    delivered (`delivered_by`, `streams.worker.committer`), so a batch in flight costs nothing in
    at-least-once. Exactly-once: a batch's records go into the open transactions, and a
    commit first waits for the batch in flight (`flush`; `streams.worker.transactions`).
    """

    def __init__(self, overlap: bool, max_failures: int, on_fault=None, transactional=False):
        self.overlap = overlap
        # Exactly-once: a batch's error goes to the caller, which aborts the transaction and
        # tries the batch again (`isolated`: record by record in a new transaction, so that no
        # record of the failed try is sent twice); a failed send is never a record's fault.
        self.passthrough = (Exception,) if transactional else ()
        self.fatal = (KafkaError,) if transactional else ()
        self.in_flight: asyncio.Future | None = None
        self.max_failures = max_failures
        self.failures_in_row = 0  # records dead-lettered as processing_failed since a success
        # called at once with an error a batch in flight could not get past: the agent may be
        # waiting for input, not on that batch
        self.on_fault = on_fault
        self.fault: BaseException | None = None
        self.busy = False  # inside submit: a batch taken but not yet handed on
        self.closed = False  # a stop is committing: batches taken now are left unprocessed

    def close(self) -> None:
        """Process no more batches (a stop): the stop commits what was delivered, and a batch
        published after that commit would be published again by the next worker.
        Batches taken meanwhile are neither processed nor committed: the next worker reads
        them. Faust's agent may take a batch or two from its buffer before it is stopped."""
        self.closed = True

    async def submit(self, events: Sequence) -> bool:
        """Take a micro-batch; control records split it so that order per user is kept.
        False: closed, the batch is left unprocessed."""
        return await self._taken(self._submit(events))

    async def _taken(self, work) -> bool:
        """Run `work` (a coroutine: one batch) marked busy; False: closed, not run."""
        if self.closed:
            work.close()
            return False
        self.busy = True
        try:
            await work
        finally:
            self.busy = False
        return True

    async def idle(self, timeout_s: float) -> None:
        """Wait until the batch taken and the one in flight are delivered (or failed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (
                self.busy or (self.in_flight is not None and not self.in_flight.done())):
            await asyncio.sleep(0.01)

    async def _submit(self, events: Sequence) -> None:
        if self.fault is not None:
            raise self.fault
        metrics.EVENTS_IN.inc(len(events))
        metrics.BATCH_SIZE.observe(len(events))
        segment = []
        for fe in events:
            if fe.message.topic != settings.topic_control:
                segment.append(fe)
                continue
            await self.submit_segment(segment)
            segment = []
            await self.flush()  # the forget follows everything before it
            await apply_control(fe)
        await self.submit_segment(segment)
        if not self.overlap:
            await self.flush()

    async def submit_segment(self, events: Sequence) -> None:
        if not events:
            return
        try:
            prepared = await prepare_segment(events)
        except self.passthrough:
            raise
        except Exception as exc:
            await self.flush()
            await self.isolate(events, exc)
            return
        scoring = None
        if prepared is not None:  # None: dead letters only, nothing to score
            scoring = asyncio.get_running_loop().run_in_executor(runtime().executor, score,
                                                                 prepared)
        previous = self.in_flight
        self.in_flight = asyncio.ensure_future(
            self._publish_after(previous, events, prepared, scoring))
        self.in_flight.add_done_callback(_retrieve)  # its error is reported through on_fault
        if previous is not None:
            await previous  # at most one batch waits while another is scored

    async def _publish_after(self, previous, events, prepared: Prepared | None, scoring) -> None:
        if previous is not None:
            await previous
        if prepared is None:
            return
        try:
            await self._publish(prepared, await scoring)
            self.failures_in_row = 0
        except self.passthrough:
            raise
        except Exception as exc:
            try:
                await self.isolate(events, exc)
            except Exception as fault:
                self.fault = fault
                if self.on_fault is not None:
                    self.on_fault(fault)
                raise

    async def isolate(self, events: Sequence, exc: Exception) -> None:
        """A batch failed: process its records one at a time, each at most twice. Records whose
        outputs were sent already are sent again (counted duplicates, as any redelivery)."""
        metrics.BATCH_ERRORS.inc()
        log.warning("a batch of %d records failed (%s: %s); processing them one by one",
                    len(events), type(exc).__name__, exc)
        for fe in events:
            error = None
            for _ in range(2):
                try:
                    await self.process_alone(fe)
                    error = None
                    break
                except self.fatal:
                    raise
                except Exception as err:
                    error = err
            if error is None:
                self.failures_in_row = 0
                continue
            self.failures_in_row += 1
            if self.failures_in_row >= self.max_failures:
                raise WorkerFault(f"{self.failures_in_row} records in a row failed to process "
                                  "(MAX_CONSECUTIVE_FAILURES): a fault of the worker, not of "
                                  "its input") from error
            msg = fe.message
            log.error("record %s[%d]@%d failed twice (%s: %s): dead-lettered as processing_failed",
                      msg.topic, msg.partition, msg.offset, type(error).__name__, error)
            await dead_letter(fe, Rejection("processing_failed",
                                            f"{type(error).__name__}: {error}"[:500]),
                              int(time.time() * 1000))

    async def isolated(self, events: Sequence, exc: Exception) -> bool:
        """`isolate` as a batch of its own (exactly-once, after the failed try was aborted)."""
        return await self._taken(self.isolate(events, exc))

    async def process_alone(self, fe) -> None:
        prepared = await prepare_segment([fe])
        if prepared is not None:
            batch = await asyncio.get_running_loop().run_in_executor(runtime().executor,
                                                                     score, prepared)
            await self._publish(prepared, batch)

    async def _publish(self, prepared: Prepared, batches: list[RecommendationBatch]) -> None:
        pending = prepared.pending
        values = render_segment(prepared, batches, int(time.time() * 1000))
        for p, value in zip(pending, values):
            delivered_by(p.faust_event, await send_output(
                recommendations_topic, p.faust_event, p.event.user_id.encode(), value))
        metrics.EVENTS_OUT.inc(len(pending))
        if prepared.degraded:
            metrics.DEGRADED.inc(len(pending))

    async def flush(self) -> None:
        if self.in_flight is not None:
            task, self.in_flight = self.in_flight, None
            await task

    async def abandon(self) -> None:
        """After a fault: let the batch in flight finish or fail; its error is reported."""
        try:
            await self.flush()
        except Exception:
            pass


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class WorkerFault(Exception):
    """Processing fails whatever the input: the worker stops rather than drop the stream."""


async def apply_control(fe) -> None:
    """A control-topic record: a forget, applied in the user's partition (re-routed there when
    it arrived in another, since only that partition's worker holds the user's state)."""
    now_ms = int(time.time() * 1000)
    result = parse_control(fe.value, settings.control_secret)
    if isinstance(result, Rejection):
        await dead_letter(fe, result, now_ms)
        return
    msg = fe.message
    expected = partition_for(result.user_id.encode(), settings.partitions)
    if msg.partition != expected:
        metrics.CONTROL_REROUTED.inc()
        log.warning("forget of user %r (requested by %r) arrived in %s[%d]: re-routed to [%d]",
                    result.user_id, result.requester, msg.topic, msg.partition, expected)
        delivered_by(fe, await send_output(control_topic, fe, result.user_id.encode(), fe.value,
                                           partition=expected))
        return
    await forget_user_state(fe, result)
    delivered_by(fe)


async def forget_user_state(faust_event, forget: Forget) -> None:
    """Tombstone the user's short-term state and erase what Redis holds about them."""
    user = forget.user_id
    await state_table.delete(faust_event, user)  # a tombstone in the changelog
    rt = runtime()
    if rt.store is not None:
        await rt.store.forget(user)
    metrics.FORGOTTEN.inc()
    log.info("forgot user %r (requested by %r): state tombstoned, long-term data erased",
             user, forget.requester)


async def prepare_segment(events: Sequence) -> Prepared | None:
    """Validate (bad records to the DLQ), update state, one Redis round trip, the models' inputs."""
    srv = serving()
    rt = srv.primary  # the store and the settings: shared by every arm
    now_ms = int(time.time() * 1000)
    valid, partitions, rules = [], settings.partitions, srv.rules
    for fe in events:
        result = decode_event(fe.value, rules, now_ms)
        if isinstance(result, Event):
            msg = fe.message
            misrouted = check_routing(result, msg.key, msg.partition, partitions)
            if misrouted is None:
                valid.append((fe, result))
                continue
            result = misrouted
        await dead_letter(fe, result, now_ms)
    if not valid:
        return None
    runtime_of = _memo(srv.runtime_of) if srv.arms else (lambda user: rt)
    pending, changed = apply_state(valid, runtime_of)
    # One changelog record per user and batch: the last state is all a restore needs.
    for user, (faust_event, state) in changed.items():
        await state_table.put(faust_event, user, state)
    users = list(dict.fromkeys(p.event.user_id for p in pending))
    long_vecs, degraded = None, rt.store is None
    if rt.store is not None:
        started = time.perf_counter()
        long_vecs = await rt.store.sync_batch(
            [HistoryAppend(p.event.user_id,
                           history_entry(p.event.item_id, rt.weights[p.event.event_type]),
                           *p.place) for p in pending if p.is_new], users,
            [vector_model(runtime_of(user)) for user in users] if srv.arms
            else [vector_model(rt)] * len(users))
        metrics.REDIS_SECONDS.observe(time.perf_counter() - started)
        degraded = long_vecs is None
        metrics.REDIS_UP.set(0 if degraded else 1)
    long_vecs = long_vecs or {}
    if not srv.arms:
        return Prepared(pending, long_vecs, degraded,
                        [scoring_group(rt, pending, list(range(len(pending))), long_vecs)])
    at_of: dict[str, list[int]] = {}
    for i, p in enumerate(pending):
        at_of.setdefault(runtime_of(p.event.user_id).arm, []).append(i)
    groups = [scoring_group(srv.runtimes[arm], [pending[i] for i in at], at, long_vecs)
              for arm, at in at_of.items()]
    return Prepared(pending, long_vecs, degraded, groups)


def _memo(runtime_of):
    """runtime_of with one hash per user and segment, not one per use."""
    known: dict = {}

    def cached(user: str) -> Runtime:
        rt = known.get(user)
        if rt is None:
            rt = known[user] = runtime_of(user)
        return rt

    return cached


def vector_model(rt: Runtime) -> tuple[str, int]:
    """Which Redis vectors `rt` may use: those its bundle wrote, of its width."""
    return rt.bundle.version, int(rt.bundle.dims["d_model"])


def scoring_group(rt: Runtime, pending: list[Pending], at: list[int], long_vecs: dict
                  ) -> ScoringGroup:
    vecs = [long_vecs.get(p.event.user_id) for p in pending]
    updates = None
    if rt.recommender.updater.enabled:
        updates = [None if lt is None else newer_events(lt, p, rt) for lt, p in zip(vecs, pending)]
    inputs = rt.recommender.inputs(
        [p.rows for p in pending], [None if lt is None else lt.vec for lt in vecs],
        [p.dt_s for p in pending], None,  # seen: the recent rows themselves, padded once
        rt.fusion_mode, rt.fixed_alpha, rt.settings.top_k, updates)
    return ScoringGroup(rt, at, inputs)


def score(prepared: Prepared) -> list[RecommendationBatch]:
    """The GPT and the fusion for a whole segment, per group (runs in the inference thread)."""
    started = time.perf_counter()
    batch = [g.rt.recommender.score(g.inputs) for g in prepared.groups]
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    return batch


@app.agent(input_topics, name="recommend")
async def recommend(stream):
    serving()  # `python -m streams worker` has loaded it; freeze it with the rest
    settle_heap()
    global active_pipeline
    pipeline = BatchPipeline(overlap=settings.batch_overlap == 1,
                             max_failures=settings.max_consecutive_failures, on_fault=crashed,
                             transactional=transactional)
    active_pipeline = pipeline
    if batches is not None:
        batches.bind(pipeline.submit, pipeline.isolated, pipeline.flush, pipeline.abandon,
                     on_fault=crashed)
    try:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            switch_to_published_bundle()
            if batches is not None:
                await batches.run(events)
            else:
                await pipeline.submit(committer.fresh(events))
    except Exception as exc:
        crashed(exc)
    finally:
        # A stop (or a crash) lets the batch in flight deliver, then commits what was
        # delivered: a clean stop re-publishes nothing.
        await pipeline.abandon()
        await commit_delivered()


active_pipeline: BatchPipeline | None = None
STOP_DRAIN_S = 10.0  # a stop waits this long at most for the batches already taken


@app.on_before_shutdown.connect
async def commit_on_stop(app, **kwargs) -> None:
    """A stop commits what was delivered while the consumer is still a group member: Faust has
    stopped fetching by then, and stops the agent (whose own last commit may be cut short by
    its cancellation) and the consumer only after this signal. Exactly-once: the batch in
    progress is handed on, the open transactions commit (or abort), then the producers stop."""
    if active_pipeline is not None:
        active_pipeline.close()
        await active_pipeline.idle(STOP_DRAIN_S)
    if batches is not None:
        await batches.idle(STOP_DRAIN_S)
        await batches.commit_open(STOP_DRAIN_S)
        await batches.stop()
    await commit_delivered()


def crashed(exc: BaseException) -> None:
    """The agent cannot go on: /healthz fails at once, then the worker stops (leaving its group
    and committing what was delivered) and `python -m streams worker` exits non-zero, so an
    orchestrator restarts it instead of a live process holding partitions it does not read."""
    if not health.ok:
        return  # reported already
    health.fail(exc)
    log.critical("the agent stopped (%s: %s): the worker exits", type(exc).__name__, exc,
                 exc_info=exc)
    asyncio.get_running_loop().call_later(CRASH_EXIT_DELAY_S, os.kill, os.getpid(),
                                          signal.SIGTERM)


@app.timer(settings.redis_retry_s)
async def retry_redis():
    """History appends and erasures kept while Redis was down go out once it is back, even if
    no event comes to carry them."""
    rt = _serving.primary if _serving is not None else None
    if rt is not None and rt.store is not None:
        await rt.store.retry_pending()


def look_for_published_bundle() -> None:
    if _serving is not None:  # before the first load, the location's bundle is the one loading
        _serving.look_for_published()


if settings.bundle_watch_s > 0:
    @app.timer(settings.bundle_watch_s)
    async def watch_bundle_location():
        """A bundle published at BUNDLE_DIR is loaded beside the running one, then swapped in."""
        look_for_published_bundle()


@app.task
async def warn_of_unsigned_control():
    """Once per worker start (the agent itself restarts on every rebalance)."""
    if not settings.control_secret:
        log.warning("CONTROL_SECRET is unset: forgets are not signed, so only the ACL of %s "
                    "keeps event producers from erasing users", settings.topic_control)


@app.task
async def reload_bundle_on_sighup():
    """SIGHUP: look at BUNDLE_DIR now (without it, SIGHUP would end the worker)."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, look_for_published_bundle)


def owned_partitions() -> set[int]:
    """The partitions of `events` (so of the state changelog) assigned to this worker."""
    return {tp.partition for tp in app.consumer.assignment()
            if tp.topic == settings.topic_events}


# So that a quiet partition still rolls the segment that holds a forget's tombstone.
ROLL_EVERY_S = changelog_roll_interval_s(settings)


@app.timer(ROLL_EVERY_S)
async def roll_changelog_segments():
    """Append the roll marker to each changelog partition this worker owns and has not
    written to since the last tick (exactly-once: in the partition's transaction)."""
    try:
        partitions = state_table.quiet(owned_partitions(), time.monotonic() - ROLL_EVERY_S)
        if batches is not None:
            await batches.write_apart(partitions, state_table.roll_marker)
        else:
            for partition in sorted(partitions):
                await state_table.roll_marker(partition)
    except Exception as exc:  # broker away, a rebalance, stopping: the next tick writes it
        log.warning("roll markers not written (tried again in %.0f s): %r", ROLL_EVERY_S, exc)


async def commit_delivered() -> None:
    """Commit the input offsets whose records are processed and delivered (at-least-once;
    exactly-once: only look up holes, offsets are committed in the batches' transactions)."""
    try:
        await committer.commit()
    except Exception as exc:  # broker away, a rebalance mid-commit, or stopping: redone later
        log.warning("offset commit failed (retried every %.1f s): %r",
                    settings.commit_interval_s, exc)


# Faust's timer loops until the app stops, so the agent's last commit calls the function above,
# not this (called during a stop, the timer returns without running it).
@app.timer(settings.commit_interval_s)
async def commit_processed_offsets():
    await commit_delivered()


recovery_watch = RecoveryWatch(settings.recovery_stall_s)


@app.timer(5.0)
async def restart_stalled_recovery():
    await recovery_watch.check(app.tables.recovery, app.consumer)


@app.page("/metrics")
async def metrics_page(web_view, request):
    return web_view.bytes(metrics.render(), content_type="text/plain")


def ready() -> bool:
    """Partitions assigned and their state recovered: an event sent now is served at once."""
    try:
        recovery = app.tables.recovery
        return (recovery.completed.is_set() and not recovery.in_recovery
                and any(tp.topic == settings.topic_events for tp in app.consumer.assignment()))
    except Exception:  # not started yet
        return False


@app.page("/healthz")
async def health_page(web_view, request):
    rt = _serving.primary if _serving is not None else None
    ok = rt is not None and health.ok
    return web_view.json({"ok": ok, "ready": ok and ready(), "agent": health.describe(),
                          "redis_up": bool(rt and rt.store and rt.store.up),
                          "model_version": rt.bundle.version if rt else None},
                         status=200 if ok else 503)


@app.page("/models")
async def models_page(web_view, request):
    """What this worker serves: per arm ("" without arms) its bundle, fusion mode and swap."""
    srv = _serving
    return web_view.json({"salt": settings.ab_salt if srv and srv.arms else None,
                          "arms": srv.describe() if srv else {}})


@app.timer(5.0)
async def sample_consumer_lag():
    """events not yet fetched by this worker, summed over its partitions (a Prometheus gauge)."""
    consumer, total = app.consumer, 0
    for tp in consumer.assignment():
        if tp.topic != settings.topic_events:
            continue
        try:
            highwater, position = consumer.highwater(tp), await consumer.position(tp)
        except Exception:  # partition revoked mid-sample
            continue
        if highwater is not None and position is not None:
            total += max(0, highwater - position)
    metrics.CONSUMER_LAG.set(total)
