"""Crashes and scale-out on the real broker: nothing lost, no state counted twice."""
from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import Counter, defaultdict

import orjson
import pytest
from conftest import unique_settings
from helpers import collect, make_events, send

from streams.bundle import load_bundle
from streams.kafka.clients import consumer, ensure_topics, producer

pytestmark = pytest.mark.integration


def final_states(settings, min_users: int, timeout: float = 30.0) -> dict:
    """The last value per user in the short-term table's changelog topic."""
    topic = f"{settings.app_id}-short_term-changelog"
    cons = consumer(settings, settings.kafka_bootstrap_servers, f"changelog-{time.time_ns()}")
    cons.subscribe([topic])
    states, idle_since, deadline = {}, time.monotonic(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = cons.poll(0.3)
            if msg is None or msg.error():
                if len(states) >= min_users and time.monotonic() - idle_since > 3:
                    break
                continue
            idle_since = time.monotonic()
            states[orjson.loads(msg.key())] = orjson.loads(msg.value()) if msg.value() else None
    finally:
        cons.close()
    return states


def send_paced(settings, events, rate: float, per_transaction: int = 0) -> threading.Thread:
    """Produce `events` at `rate`; with `per_transaction`, as an upstream writing in
    transactions of that many records (a commit marker after each)."""
    def run():
        extra = {"transactional.id": f"up-{settings.app_id}"} if per_transaction else {}
        prod = producer(settings, settings.kafka_bootstrap_servers, **extra)
        if per_transaction:
            prod.init_transactions(30)
            prod.begin_transaction()
        start = time.monotonic()
        for i, event in enumerate(events):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            prod.produce(settings.topic_events, key=event.user_id.encode(), value=event.to_json())
            prod.poll(0)
            if per_transaction and (i + 1) % per_transaction == 0:
                prod.commit_transaction(30)
                prod.begin_transaction()
        if per_transaction:
            prod.commit_transaction(30)
        prod.flush(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def every_output(settings, events, timeout: float) -> tuple[list, int]:
    """The outputs (read read_committed) once every event has one, and how many are
    duplicates. Until every event has an output, not until as many outputs as events:
    redelivered events' duplicates reach that count early, and a record Faust skipped after a
    restart is fetched again only once the committer's hole check (HOLE_CHECK_S, 10 s) has
    looked for it."""
    out = collect(settings, settings.topic_recommendations, len(events), timeout=timeout,
                  settle=3, until_ids={e.event_id for e in events})
    got = Counter(r["event_id"] for r in out)
    missing = {e.event_id for e in events} - set(got)
    assert not missing, f"{len(missing)} events without a recommendation"
    return out, sum(n - 1 for n in got.values())


def assert_state_counts_each_event_once(states: dict, events) -> None:
    sent = defaultdict(set)
    for e in events:
        sent[e.user_id].add(e.event_id)
    for user, ids in sent.items():
        state = states[user]
        assert state["n_events"] == len(ids), (user, state["n_events"], len(ids))
        assert len(state["event_ids"]) == len(set(state["event_ids"]))
        assert set(state["event_ids"]) <= ids


# Exactly-once with small batches: the backlog after a kill fills them, so transactions hold
# several batches (TRANSACTION_COMMIT_MS) as well as one (a batch that is not full commits).
SMALL_BATCHES = {"at_least_once": {}, "exactly_once": {"batch_size": 8}}


@pytest.mark.parametrize("guarantee,per_transaction", [
    ("at_least_once", 0), ("exactly_once", 0),
    ("exactly_once", 5)])  # an upstream writing in transactions: a marker every 5 records
def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(stack, quick_bundle, workers,
                                                                   guarantee, per_transaction):
    settings = unique_settings(stack, quick_bundle, partitions=2, processing_guarantee=guarantee,
                               **SMALL_BATCHES[guarantee])
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:20]
    events = make_events(400, users=8, items=items)
    feeder = send_paced(settings, events, rate=100, per_transaction=per_transaction)
    time.sleep(1.5)
    worker.kill()  # SIGKILL: no commit, no flush, no goodbye
    time.sleep(0.5)
    restarted = workers(settings)
    feeder.join(30)
    out, duplicates = every_output(settings, events, timeout=90)
    print(f"{guarantee}, {per_transaction or 'no'} records per upstream transaction: "
          f"in={len(events)} out={len(out)} duplicated={duplicates} lost=0")
    assert_state_counts_each_event_once(final_states(settings, 8), events)
    if guarantee == "exactly_once":
        assert duplicates == 0
        # the backlog left by the kill was committed in transactions of several batches
        held = transaction_batches(restarted)
        print(f"transaction_batches (cumulative per bucket): {held}")
        assert held["count"] > held["1.0"], held


def transaction_batches(worker) -> dict:
    """The worker's `transaction_batches` histogram: cumulative bucket counts and the count."""
    url = f"http://127.0.0.1:{worker.env['WEB_PORT']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {m[0]: float(m[1]) for m in
           re.findall(r'^transaction_batches_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}
    out["count"] = float(re.search(r"^transaction_batches_count (\S+)$", text, re.M)[1])
    return out


def test_second_worker_takes_over_partitions_and_state(stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle, partitions=4)
    ensure_topics(settings, stack["kafka"])
    first = workers(settings)
    second = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:20]
    before = make_events(120, users=12, items=items, prefix="before")
    send(settings, before)
    collect(settings, settings.topic_recommendations, len(before), timeout=60)
    log = second.log_path.read_bytes().decode(errors="replace")
    assigned = log[log.find("newly assigned"):]
    assert settings.topic_events in assigned  # the second worker did own partitions of events
    second.stop()  # its partitions and their users' state move to the first worker
    after = make_events(120, users=12, items=items, prefix="after", ts=before[-1].ts + 1000)
    send(settings, after)
    # until every event's output, not a count: the handover may redeliver some (counted
    # duplicates), and records Faust fetched but never handed over come back after HOLE_CHECK_S
    out = collect(settings, settings.topic_recommendations, 0, timeout=90, settle=2,
                  until_ids={e.event_id for e in before + after})
    assert {e.event_id for e in before + after} <= {r["event_id"] for r in out}
    assert_state_counts_each_event_once(final_states(settings, 12), before + after)
    # the survivor's recommendations after the handover use each user's full window
    first.stop()


def test_exactly_once_with_two_workers_one_killed_and_restarted_mid_stream(stack, quick_bundle,
                                                                           workers):
    """Scale-out: two workers share the group; one is SIGKILLed mid-stream and started again.
    A read_committed reader sees each output once."""
    settings = unique_settings(stack, quick_bundle, partitions=4,
                               processing_guarantee="exactly_once",
                               **SMALL_BATCHES["exactly_once"])
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    second = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:20]
    events = make_events(720, users=16, items=items)
    feeder = send_paced(settings, events, rate=60)
    time.sleep(5)
    second.kill()
    time.sleep(3)
    workers(settings, ready=False)
    feeder.join(60)
    out, duplicates = every_output(settings, events, timeout=120)
    print(f"exactly_once, two workers, one killed: in={len(events)} out={len(out)} "
          f"duplicated={duplicates} lost=0")
    assert_state_counts_each_event_once(final_states(settings, 16), events)
    assert duplicates == 0


def test_exactly_once_on_a_broker_without_transactions_stops_with_the_reason(
        stack, quick_bundle, tmp_path, workers):
    """A transaction state log that cannot be created (replication factor 3 on one broker):
    the worker exits at start with a one-line reason, instead of hanging."""
    from streams.local.stack import LocalKafka

    kafka = LocalKafka(tmp_path / "kafka",
                       overrides={"transaction.state.log.replication.factor": "3"})
    kafka.start()
    try:
        settings = unique_settings({"kafka": kafka.bootstrap, "redis": stack["redis"]}, quick_bundle,
                                   processing_guarantee="exactly_once",
                                   transaction_init_timeout_s=5.0)
        worker = workers(settings, ready=False)
        assert worker.proc.wait(90) == 2
        errors = [line for line in worker.log_path.read_text(errors="replace").splitlines()
                  if line.startswith("error:")]
        assert len(errors) == 1 and "needs Kafka transactions" in errors[0]
        assert "transaction.state.log" in errors[0] and "no answer within 5 s" in errors[0]
    finally:
        kafka.stop()
