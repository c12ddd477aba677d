"""BatchPipeline's ordering rules, with the Kafka, Redis and model steps replaced by fakes.

What the real broker shows (tests/integration/test_faults.py) depends on timing; these rules
are checked here deterministically: outputs and releases (acks) keep input order, and a
record is released only after its output was sent.
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest



def _import_pipeline():
    """streams.pipeline builds the Faust App (never started here), which wants a broker address;
    give it one for the import only, so that no other test sees it in the environment."""
    saved = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    os.environ.setdefault("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    try:
        from streams import pipeline
    finally:
        if saved is None:
            del os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    return pipeline


pipeline = _import_pipeline()


class FakeMessage:
    def __init__(self, offset: int):
        self.tp, self.offset, self.refcount, self.generation_id = ("events", 0), offset, 1, 1

    def incref(self):
        self.refcount += 1


class FakeEvent:
    def __init__(self, offset: int, valid: bool, log: list):
        self.message, self.valid, self.log = FakeMessage(offset), valid, log
        self.value = b'{"event_id": "e%d"}' % offset

    def ack(self) -> bool:
        self.message.refcount -= 1
        if self.message.refcount == 0:
            self.log.append(("release", self.message.offset))
            return True
        return False


@pytest.fixture
def fake_steps(monkeypatch):
    log: list = []
    runtime = SimpleNamespace(executor=ThreadPoolExecutor(1))

    async def prepare(events):
        valid = [fe for fe in events if fe.valid]
        if not valid:
            return None  # dead letters only
        return pipeline.Prepared([SimpleNamespace(faust_event=fe, event=SimpleNamespace(
            user_id=f"u{fe.message.offset}")) for fe in valid], {}, False, None)

    def score(prepared, rt):
        time.sleep(0.05)  # the inference thread is slower than the loop
        return prepared

    async def send(key, value):
        log.append(("send", value))

    monkeypatch.setattr(pipeline, "prepare_segment", prepare)
    monkeypatch.setattr(pipeline, "score", score)
    monkeypatch.setattr(pipeline, "runtime", lambda: runtime)
    monkeypatch.setattr(pipeline, "render_outputs", lambda pending, *a: [
        p.faust_event.message.offset for p in pending])
    monkeypatch.setattr(pipeline, "recommendations_topic", SimpleNamespace(send=send))
    stream = SimpleNamespace(app=SimpleNamespace(consumer_generation_id=1, sensors=SimpleNamespace(
        on_message_out=lambda *a: None)))
    return log, stream


def take(events):
    """What Faust's take_events does after the agent's body returns: ack each event once."""
    for fe in events:
        fe.ack()


def test_sends_and_releases_keep_input_order(fake_steps):
    log, stream = fake_steps

    async def run():
        pipe = pipeline.BatchPipeline(stream)
        batches = [[FakeEvent(0, True, log), FakeEvent(1, True, log)],
                   [FakeEvent(2, False, log)],  # a dead letter alone, while batch 1 is scored
                   [FakeEvent(3, True, log)]]
        for batch in batches:
            await pipe.submit(batch)
            take(batch)
        await pipe.flush()

    asyncio.run(run())
    assert log == [("send", 0), ("send", 1), ("release", 0), ("release", 1), ("release", 2),
                   ("send", 3), ("release", 3)]


def test_nothing_is_released_before_its_output_is_sent(fake_steps):
    log, stream = fake_steps

    async def run():
        pipe = pipeline.BatchPipeline(stream)
        batch = [FakeEvent(0, True, log)]
        await pipe.submit(batch)
        take(batch)  # Faust's own ack: not the last reference any more
        assert log == []  # still being scored
        await pipe.flush()

    asyncio.run(run())
    assert log == [("send", 0), ("release", 0)]


def test_a_batch_from_before_a_rebalance_is_not_released(fake_steps):
    """Faust reads it again from the committed offset; an old ack could let a commit skip it."""
    log, stream = fake_steps

    async def run():
        pipe = pipeline.BatchPipeline(stream)
        batch = [FakeEvent(0, True, log)]
        await pipe.submit(batch)
        take(batch)
        stream.app.consumer_generation_id = 2  # a rebalance while the batch is scored
        await pipe.flush()

    asyncio.run(run())
    assert ("release", 0) not in log
