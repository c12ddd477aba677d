"""BatchPipeline's ordering rules, with the Kafka, Redis and model steps replaced by fakes.

What the real broker shows (tests/integration/test_faults.py) depends on timing; these rules
are checked here deterministically: outputs keep input order, a record counts as processed
(`delivered_by`) only after its output was sent, and exactly-once mode never leaves a batch in
flight when the agent takes the next one.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest


def _import_pipeline():
    """streams.worker.pipeline builds the Faust App (never started here); the import needs no broker."""
    from streams.worker import pipeline

    return pipeline


pipeline = _import_pipeline()


class FakeEvent:
    def __init__(self, offset: int, valid: bool = True, topic: str = "events"):
        self.message = SimpleNamespace(tp=(topic, 0), topic=topic, partition=0, offset=offset)
        self.valid, self.value = valid, b'{"event_id": "e%d"}' % offset


FAILING = {13, 23}  # offsets whose output cannot be sent (a fault of the processing)


@pytest.fixture
def log(monkeypatch):
    log: list = []
    runtime = SimpleNamespace(executor=ThreadPoolExecutor(1))

    async def prepare(events):
        for fe in events:
            if not fe.valid:
                log.append(("dlq", fe.message.offset))
                pipeline.delivered_by(fe, "dlq-future")
        valid = [fe for fe in events if fe.valid]
        if not valid:
            return None  # dead letters only
        return pipeline.Prepared([SimpleNamespace(faust_event=fe, event=SimpleNamespace(
            user_id=f"u{fe.message.offset}")) for fe in valid], {}, False, [])

    def score(prepared):
        time.sleep(0.05)  # the inference thread is slower than the loop
        return prepared

    async def send_output(topic, faust_event, key, value):
        if value in FAILING:
            raise RuntimeError("broken record")
        log.append(("send", value))
        return f"future-{value}"

    async def dead_letter(fe, rejection, now_ms):
        log.append(("dlq", fe.message.offset, rejection.reason))

    async def apply_control(fe):
        log.append(("control", fe.message.offset))

    monkeypatch.setattr(pipeline, "prepare_segment", prepare)
    monkeypatch.setattr(pipeline, "score", score)
    monkeypatch.setattr(pipeline, "runtime", lambda: runtime)
    monkeypatch.setattr(pipeline, "render_segment", lambda prepared, *a: [
        p.faust_event.message.offset for p in prepared.pending])
    monkeypatch.setattr(pipeline, "send_output", send_output)
    monkeypatch.setattr(pipeline, "dead_letter", dead_letter)
    monkeypatch.setattr(pipeline, "apply_control", apply_control)
    monkeypatch.setattr(pipeline, "delivered_by", lambda fe, *futures: log.append(
        ("processed", fe.message.offset, futures)))
    return log


def run_batches(batches, overlap: bool, after_each=lambda: None, max_failures: int = 5):
    async def run():
        pipe = pipeline.BatchPipeline(overlap=overlap, max_failures=max_failures)
        for batch in batches:
            await pipe.submit(batch)
            after_each()
        await pipe.flush()

    asyncio.run(run())


def test_outputs_keep_input_order_and_count_only_once_sent(log):
    run_batches([[FakeEvent(0), FakeEvent(1)],
                 [FakeEvent(2, valid=False)],  # a dead letter alone, while batch 0 is scored
                 [FakeEvent(3)]], overlap=True)
    sends = [entry[1] for entry in log if entry[0] == "send"]
    assert sends == [0, 1, 3]
    for offset in (0, 1, 3):
        assert log.index(("send", offset)) < log.index(("processed", offset, (f"future-{offset}",)))
    assert ("processed", 2, ("dlq-future",)) in log


def test_overlap_leaves_one_batch_in_flight(log):
    seen_after_submit = []
    run_batches([[FakeEvent(0)], [FakeEvent(1)]], overlap=True,
                after_each=lambda: seen_after_submit.append(list(log)))
    assert ("send", 0) not in seen_after_submit[0]  # batch 0 still scored when batch 1 comes


def test_exactly_once_finishes_each_batch_before_the_next(log):
    """Exactly-once commits a batch's transactions once submit returns: its outputs must be
    sent by then."""
    seen_after_submit = []
    run_batches([[FakeEvent(0)], [FakeEvent(1)]], overlap=False,
                after_each=lambda: seen_after_submit.append(list(log)))
    assert ("send", 0) in seen_after_submit[0]
    assert ("send", 1) in seen_after_submit[1]


def test_a_closed_pipeline_finishes_what_it_took_and_processes_nothing_after(log):
    """A stop closes the pipeline, waits until idle, then commits: a batch taken after the
    commit must not be published (its offset would not be committed: a duplicate later)."""
    async def run():
        pipe = pipeline.BatchPipeline(overlap=True, max_failures=5)
        await pipe.submit([FakeEvent(0)])  # in flight when the stop comes
        pipe.close()
        await pipe.idle(5.0)
        done = list(log)
        await pipe.submit([FakeEvent(1)])  # the agent's buffer still held it
        await pipe.flush()
        return done

    done = asyncio.run(run())
    assert ("send", 0) in done
    assert not [entry for entry in log if entry[1:2] == (1,)]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failed_batch_is_redone_one_by_one_and_a_record_failing_twice_is_dead_lettered(
        log, overlap):
    run_batches([[FakeEvent(12), FakeEvent(13)], [FakeEvent(14)]], overlap=overlap)
    processed = [entry[1] for entry in log if entry[0] == "processed"]
    assert processed == [12, 12, 14]  # 12 sent again (a counted duplicate); 13 never counted
    assert ("dlq", 13, "processing_failed") in log
    assert log.index(("dlq", 13, "processing_failed")) < log.index(("send", 14))


def test_a_batch_failing_before_scoring_is_redone_one_by_one(log, monkeypatch):
    prepare = pipeline.prepare_segment

    async def fragile(events):
        if any(fe.message.offset == 5 for fe in events):
            raise ValueError("a value the code does not expect")
        return await prepare(events)

    monkeypatch.setattr(pipeline, "prepare_segment", fragile)
    run_batches([[FakeEvent(4), FakeEvent(5), FakeEvent(6)]], overlap=True)
    assert [entry[1] for entry in log if entry[0] == "send"] == [4, 6]
    assert ("dlq", 5, "processing_failed") in log


def test_exactly_once_leaves_a_failed_batch_to_its_transaction_and_isolates_it_when_asked(log):
    """Exactly-once: a batch's error reaches the caller (which aborts and tries again); the
    retry record by record dead-letters the record that fails, and a failed send is never
    a record's fault."""
    async def run():
        pipe = pipeline.BatchPipeline(overlap=False, max_failures=5, transactional=True)
        with pytest.raises(RuntimeError, match="broken record"):
            await pipe.submit([FakeEvent(12), FakeEvent(13)])
        assert ("dlq", 13, "processing_failed") not in log
        assert await pipe.isolated([FakeEvent(12), FakeEvent(13)], RuntimeError("broken"))

    asyncio.run(run())
    assert ("dlq", 13, "processing_failed") in log


def test_exactly_once_never_dead_letters_a_failed_send(log, monkeypatch):
    from aiokafka.errors import KafkaError

    async def send_output(topic, faust_event, key, value):
        raise KafkaError("the broker went away")

    monkeypatch.setattr(pipeline, "send_output", send_output)

    async def run():
        pipe = pipeline.BatchPipeline(overlap=False, max_failures=5, transactional=True)
        await pipe.isolated([FakeEvent(1)], KafkaError("first try"))

    with pytest.raises(KafkaError):
        asyncio.run(run())
    assert not [entry for entry in log if entry[0] == "dlq"]


def test_failures_in_a_row_stop_the_agent_instead_of_dead_lettering_the_stream(log):
    with pytest.raises(pipeline.WorkerFault, match="2 records in a row"):
        run_batches([[FakeEvent(13), FakeEvent(23)]], overlap=True, max_failures=2)
    assert [entry for entry in log if entry[0] == "dlq"] == [("dlq", 13, "processing_failed")]


def test_a_success_between_failures_resets_the_count(log):
    run_batches([[FakeEvent(13)], [FakeEvent(1)], [FakeEvent(23)]], overlap=True, max_failures=2)
    assert [entry[1] for entry in log if entry[0] == "dlq"] == [13, 23]


def test_a_control_record_splits_the_batch_and_follows_what_came_before(log):
    control = FakeEvent(2, topic=pipeline.settings.topic_control)
    run_batches([[FakeEvent(0), FakeEvent(1), control, FakeEvent(3)]], overlap=True)
    steps = [entry[:2] for entry in log if entry[0] in ("send", "control")]
    assert steps == [("send", 0), ("send", 1), ("control", 2), ("send", 3)]


def test_state_table_codec_reads_fausts_json_and_writes_json():
    """The table's values go through orjson; changelogs written by Faust's json codec (older
    workers) restore to the same state, and what we write is plain JSON."""
    import json

    from faust.serializers import codecs

    pipeline = _import_pipeline()
    table = pipeline.short_term_table
    state = {"items": [["7", 1000, "click"], ["9", 1001, "view"]], "event_ids": ["a", "é"],
             "n_events": 2}
    assert table.value_serializer == "orjson" and table.data.value_serializer == "orjson"
    codec = codecs.get_codec("orjson")
    assert codec.loads(codecs.get_codec("json").dumps(state)) == state
    assert json.loads(codec.dumps(state)) == state


def test_rendered_numbers_are_the_rounded_values_in_short_form():
    """float32 model outputs, rounded: the message carries 0.07898, not 0.07897999882698059."""
    import numpy as np
    import orjson

    from streams.bundle import MASKED_SCORE
    from streams.inference import RecommendationBatch

    items = SimpleNamespace(ids_by_row=(None, "i1", "i2", "i3"),
                            titles_by_row=(None, "T1", "T2", "T3"))
    item_emb = np.zeros((4, 3), np.float32)
    item_emb[3] = [1.0, 0.0, 0.0]  # h_s . e = h_s[0] for row 3
    rt = SimpleNamespace(bundle=SimpleNamespace(items=items, version="v1"), fusion_mode="fixed",
                         recommender=SimpleNamespace(item_emb=item_emb), arm="")
    batch = RecommendationBatch(
        fused=np.array([[0.078979995, -5.8632998, 1.0], [2.5, -0.0000004, 123.456789]],
                       dtype=np.float32),
        alpha=np.array([0.30000001, 1.0], dtype=np.float32),
        rows=np.array([[3, 1], [2, 0]]),  # 0: padding, masked (k above the items left unseen)
        scores=np.array([[4.72069979, 4.66970015], [1.0, MASKED_SCORE]], dtype=np.float32),
        item_item=np.array([[1.5, 0.0], [0.25, 0.0]], dtype=np.float32),
        h_s=np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    event = SimpleNamespace(event_id="e", user_id="u", item_id="i9", ts=5)
    pending = [SimpleNamespace(event=event)] * 2
    values = pipeline.render_outputs(pending, batch, rt, {}, False, 7)
    first, second = (orjson.loads(v) for v in values)
    assert first["interest"] == [0.07898, -5.8633, 1.0]
    assert second["interest"] == [2.5, -0.0, 123.45679]
    # the score's short-term part alpha * h_s . e, its item-item part and the rest, its
    # long-term part
    assert first["items"] == [{"item_id": "i3", "score": 4.7207, "short_term": 0.6,
                               "long_term": 2.6207, "item_item": 1.5, "title": "T3"},
                              {"item_id": "i1", "score": 4.6697, "short_term": 0.0,
                               "long_term": 4.6697, "item_item": 0.0, "title": "T1"}]
    assert (first["alpha"], second["alpha"]) == (0.3, 1.0)
    assert b"0.07898," in values[0] and b"4.7207," in values[0]  # the short form on the wire
    assert second["items"] == [{"item_id": "i2", "score": 1.0, "short_term": 0.0,
                                "long_term": 0.75, "item_item": 0.25,
                                "title": "T2"}]  # masked: left out
    assert (first["event_ts"], first["emitted_ts"], first["long_term"]) == (5, 7, None)


def test_apply_state_maps_recent_items_to_rows_and_skips_items_the_catalog_lost(monkeypatch):
    from streams.events import Event

    prior = {"items": [["7", 1000, "click"], ["gone", 2000, "view"], ["9", 3000, "click"]],
             "event_ids": ["old"], "n_events": 3}
    monkeypatch.setattr(pipeline, "state_table", SimpleNamespace(get={"u1": prior}.get))
    rt = SimpleNamespace(bundle=SimpleNamespace(items=SimpleNamespace(row_of={"7": 1, "9": 2})))
    events = [Event("new", "u1", "7", "click", 4500), Event("old", "u1", "9", "click", 3000),
              Event("first", "u2", "9", "view", 10)]
    from streams import metrics

    def skipped_so_far():
        return metrics.REGISTRY.get_sample_value("state_items_not_in_catalog_total")

    skipped = skipped_so_far()
    pending, changed = pipeline.apply_state([(f"fe{i}", e) for i, e in enumerate(events)],
                                            lambda user: rt)
    assert [p.rows for p in pending] == [[1, 2, 1], [1, 2, 1], [2]]  # "gone" has no row
    assert skipped_so_far() - skipped == 2  # counted each time it is left out
    assert [it[0] for it in pending[0].items] == ["7", "gone", "9", "7"]  # kept in the state
    assert [p.is_new for p in pending] == [True, False, True]  # "old" is a redelivery
    assert [p.dt_s for p in pending] == [1.5, 0.0, 0.0]
    assert {user: fe for user, (fe, _) in changed.items()} == {"u1": "fe0", "u2": "fe2"}
    assert changed["u1"][1]["n_events"] == 4


def test_newer_events_are_the_states_events_after_the_vectors_place():
    import numpy as np

    from streams.longterm.store import LongTermVector

    rt = SimpleNamespace(bundle=SimpleNamespace(items=SimpleNamespace(row_of={"a": 1, "b": 2})),
                         weights={"click": 1.0, "buy": 3.0})
    items = (("a", 1, "click"), ("gone", 2, "click"), ("b", 3, "buy"))
    lt = LongTermVector(np.zeros(2, np.float32), 1, 0, np.ones(4, np.float32), 2.5, ("e1", 4))

    def pending(place):
        return SimpleNamespace(place=place, items=items)

    update = pipeline.newer_events(lt, pending(("e1", 6)), rt)
    assert update.events == [(2, 3.0)] and update.weight == 2.5  # "gone": not in the catalog
    assert pipeline.newer_events(lt, pending(("e1", 7)), rt).events == [(1, 1.0), (2, 3.0)]
    assert pipeline.newer_events(lt, pending(("e1", 4)), rt) is None  # covered already
    assert pipeline.newer_events(lt, pending(("e2", 6)), rt) is None  # another lineage
    assert pipeline.newer_events(lt, pending(("e1", 8)), rt) is None  # older than the state
    plain = LongTermVector(np.zeros(2, np.float32), 1, 0)  # written without its mean
    assert pipeline.newer_events(plain, pending(("e1", 6)), rt) is None
