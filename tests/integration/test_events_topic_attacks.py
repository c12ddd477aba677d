"""The events topic as an attacker (or a careless producer) sees it, on the real broker and Redis:
no record stops the worker, splits a user's state or erases a user; a crash ends the worker."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import orjson
import pytest
from conftest import ROOT, settings_env, unique_settings
from helpers import collect, make_events, send

from streams.bundle import load_bundle
from streams.events import Event, forget_record, partition_for
from streams.kafka.clients import changelog_topic, consumer, ensure_topics, producer
from streams.local.stack import LocalRedis
from streams.longterm.store import hist_key, place_key, redis_client, vec_key

pytestmark = pytest.mark.integration


def user_events(user: str, items, n: int, prefix: str) -> list[Event]:
    now = int(time.time() * 1000)
    return [Event(f"{prefix}-{i}", user, items[i % len(items)], "click", now + i) for i in range(n)]


def changelog_records(settings, timeout: float = 20.0, settle: float = 1.0
                      ) -> list[tuple[int, str, dict | None]]:
    """Every record of the state changelog as (partition, user, state or None), in log order,
    up to the partitions' ends `settle` seconds after the call (what the worker queued by then
    has reached the broker; it appends roll markers all along, so the log is never idle)."""
    from confluent_kafka import TopicPartition

    time.sleep(settle)
    cons = consumer(settings, settings.kafka_bootstrap_servers, f"cl-{time.time_ns()}")
    topic = changelog_topic(settings)
    marks = {p: cons.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
             for p in range(settings.partitions)}
    ends = {p: high for p, (_, high) in marks.items()}
    cons.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    out, deadline = [], time.monotonic() + timeout
    behind = {p for p, (low, high) in marks.items() if high > low}

    def update_behind():  # the consumer's position steps over transaction markers too
        for tp in cons.position([TopicPartition(topic, p) for p in ends]):
            if tp.offset >= ends[tp.partition]:
                behind.discard(tp.partition)

    try:
        while behind and time.monotonic() < deadline:
            msg = cons.poll(0.3)
            if msg is not None and not msg.error() and msg.offset() < ends[msg.partition()]:
                out.append((msg.partition(), orjson.loads(msg.key()),
                            orjson.loads(msg.value()) if msg.value() else None))
            update_behind()
    finally:
        cons.close()
    assert not behind, f"changelog partitions {sorted(behind)} not read to their end"
    return out


def test_records_up_to_the_broker_limit_are_dead_lettered_in_every_encoding(
        stack, quick_bundle, workers):
    """A ~1 MB value (not UTF-8, quotes, control characters, multi-byte text) or key: each is
    dead-lettered with an excerpt, its size and sha256; the worker stays up and serving."""
    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:5]
    size = 990_000  # under the producer's and the broker's default 1 MB limits
    values = [bytes(range(128, 256)) * (size // 128), b'"' * size, b"\x01" * (size - 1),
              ("é€😀" * (size // 9)).encode()[:size - 7]]
    assert len({len(v) for v in values}) == len(values)  # told apart by size below
    big_key_event = Event("big-key", "bk-user", items[0], "click", int(time.time() * 1000))
    prod = producer(settings, stack["kafka"], **{"message.max.bytes": 1_048_000})
    for value in values:
        prod.produce(settings.topic_events, key=b"raw", value=value,
                     headers=[("trace-id", b"t-1")])
    prod.produce(settings.topic_events, key=b"k" * 500_000, value=big_key_event.to_json())
    now = int(time.time() * 1000)
    small = {b"": "empty_payload",
             json.dumps({"event_id": "e", "user_id": "u" * 129, "item_id": items[0],
                         "event_type": "click", "ts": now}).encode(): "id_too_long",
             json.dumps({"event_id": "e", "user_id": "u", "item_id": items[0],
                         "event_type": "click", "ts": now // 1000}).encode(): "invalid_ts"}
    for value in small:
        prod.produce(settings.topic_events, key=b"u", value=value)
    assert prod.flush(60) == 0
    good = make_events(10, items=items)
    send(settings, good)

    out = collect(settings, settings.topic_recommendations, 0, until_ids={e.event_id for e in good})
    assert {r["event_id"] for r in out} == {e.event_id for e in good}
    dlq = collect(settings, settings.topic_dlq, len(values) + 1 + len(small), settle=1.0)
    assert len(dlq) == len(values) + 1 + len(small)
    assert sorted(d["reason"] for d in dlq if d["key"] == "u") == sorted(small.values())
    by_size = {d["payload_size"]: d for d in dlq if d["reason"] == "payload_too_large"}
    assert len(by_size) == len(values)
    for value in values:
        rec = by_size[len(value)]
        assert rec["payload_truncated"] and rec["payload_sha256"] == hashlib.sha256(value).hexdigest()
    [wrong_key] = [d for d in dlq if d["reason"] == "wrong_key"]
    assert wrong_key["key_size"] == 500_000 and len(wrong_key["key"]) == 1024
    assert worker.proc.poll() is None

    from confluent_kafka import TopicPartition
    cons = consumer(settings, stack["kafka"], f"h-{time.time_ns()}")
    cons.assign([TopicPartition(settings.topic_dlq, 0, 0)])
    headers = []
    while len(headers) < len(dlq):
        msg = cons.poll(5)
        assert msg is not None
        headers.append(msg.headers())
    cons.close()
    assert headers.count([("trace-id", b"t-1")]) == len(values)  # the input's headers kept


def test_a_misrouted_event_is_dead_lettered_and_a_users_state_stays_in_one_partition(
        stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle, partitions=4)
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:6]
    user = "routed-user"
    home = partition_for(user.encode(), settings.partitions)
    good = user_events(user, items, 4, "ok")
    send(settings, good[:2])
    prod = producer(settings, stack["kafka"])
    misrouted = user_events(user, items, 3, "bad")
    prod.produce(settings.topic_events, key=b"someone-else", value=misrouted[0].to_json())
    prod.produce(settings.topic_events, value=misrouted[1].to_json())  # no key
    prod.produce(settings.topic_events, key=user.encode(), value=misrouted[2].to_json(),
                 partition=(home + 1) % settings.partitions)
    assert prod.flush(30) == 0
    send(settings, good[2:])

    out = collect(settings, settings.topic_recommendations, 0, until_ids={e.event_id for e in good},
                  settle=1.0)
    assert {r["event_id"] for r in out} == {e.event_id for e in good}
    dlq = collect(settings, settings.topic_dlq, 3, settle=1.0)
    assert sorted(d["reason"] for d in dlq) == ["wrong_key", "wrong_key", "wrong_partition"]
    assert all("user_id" in d["detail"] or "belongs in" in d["detail"] for d in dlq)
    records = [r for r in changelog_records(settings) if r[1] == user]
    assert records and {partition for partition, _, _ in records} == {home}
    assert records[-1][2]["n_events"] == 4 and list(records[-1][2]["event_ids"]) == [
        e.event_id for e in good]


def test_a_control_field_on_an_event_erases_nobody_and_a_misrouted_forget_still_erases(
        stack, quick_bundle, workers, redis_sync):
    settings = unique_settings(stack, quick_bundle, partitions=4)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:6]
    user = "victim-user"
    events = user_events(user, items, 3, "v")
    prod = producer(settings, stack["kafka"])
    for event in events:
        body = json.loads(event.to_json())
        body["control"] = "forget"  # an attacker's extra field: read as an event
        prod.produce(settings.topic_events, key=user.encode(), value=json.dumps(body).encode())
    assert prod.flush(30) == 0
    out = collect(settings, settings.topic_recommendations, 3, settle=1.0)
    assert [r["event_id"] for r in out] == [e.event_id for e in events]
    assert redis_sync.llen(hist_key(user)) == 3
    assert [r for r in changelog_records(settings) if r[1] == user][-1][2]["n_events"] == 3

    # a forget keyed to another partition: re-routed to the user's, applied there
    home = partition_for(user.encode(), settings.partitions)
    prod.produce(settings.topic_control, key=b"x", value=forget_record(user, "dpo@example"),
                 partition=(home + 1) % settings.partitions)
    assert prod.flush(30) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and redis_sync.exists(hist_key(user)):
        time.sleep(0.3)
    assert not redis_sync.exists(hist_key(user), place_key(user), vec_key(user))
    final = [r for r in changelog_records(settings) if r[1] == user]
    assert final[-1] == (home, user, None) and {p for p, _, _ in final} == {home}
    log = worker.tail(20_000)
    assert "forgot user 'victim-user' (requested by 'dpo@example')" in log
    assert "re-routed" in log


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_forget_leaves_no_earlier_state_readable_in_the_changelog(
        stack, quick_bundle, workers, redis_sync, guarantee):
    """FORGET_WITHIN_S bounds how long the user's earlier states stay in the changelog, even in
    a partition that receives nothing after the forget, and even when the worker that did the
    forget stops at once: the next owner keeps the bound. A user beside them in that
    partition keeps their state through it."""
    within = 8.0
    settings = unique_settings(stack, quick_bundle, forget_within_s=within,
                               processing_guarantee=guarantee)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:6]
    user = "erase-me"
    home = partition_for(user.encode(), settings.partitions)
    keeper = next(f"keep-{i}" for i in range(100)
                  if partition_for(f"keep-{i}".encode(), settings.partitions) == home)
    events = user_events(user, items, 6, "f") + user_events(keeper, items, 3, "k")
    for event in events:  # one batch each: one state record each
        send(settings, [event])
        time.sleep(0.1)
    collect(settings, settings.topic_recommendations, len(events))
    # (earlier states may be compacted already: the latest is what the forget must remove)
    assert [r for r in changelog_records(settings) if r[1] == user and r[2]]

    done = subprocess.run([sys.executable, "-m", "streams", "forget", user, "--requester", "t"],
                          env=settings_env(settings), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["control_sent"] and printed["redis_erased"] and printed["requester"] == "t"
    forgotten_at, deadline = time.monotonic(), time.monotonic() + 30
    while "forgot user 'erase-me'" not in worker.tail(20_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopping_at = time.monotonic()
    worker.stop()
    assert stopping_at - forgotten_at < within / 2  # at once: well before FORGET_WITHIN_S
    workers(settings)

    deadline, left = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        left = [r for r in changelog_records(settings) if r[1] == user and r[2]]
        if not left:
            break
        time.sleep(1)
    assert left == [], f"{len(left)} earlier states still readable"
    assert not redis_sync.exists(hist_key(user))
    send(settings, user_events(keeper, items, 1, "k2"))
    collect(settings, settings.topic_recommendations, 0, until_ids={"k2-0"})
    kept = [r[2] for r in changelog_records(settings) if r[1] == keeper and r[2]]
    assert kept[-1]["n_events"] == 4  # restored over the roll markers, then one more event


def test_a_redis_stall_counts_no_event_twice(stack, quick_bundle, workers, tmp_path):
    """Writes that time out while Redis is stopped still run when it resumes, and the worker
    sends them again from its buffer: each event is in the long history once."""
    redis = LocalRedis(tmp_path / "redis")
    redis.start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        settings = unique_settings(stack, quick_bundle, redis_url=url, redis_retry_s=0.5)
        ensure_topics(settings, stack["kafka"])
        workers(settings)
        items = load_bundle(quick_bundle).items.item_ids[:12]
        user = "stalled-user"
        events = user_events(user, items, 12, "s")
        send(settings, events[:4])
        collect(settings, settings.topic_recommendations, 4)
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            for event in events[4:8]:
                send(settings, [event])
                time.sleep(0.6)  # several timed-out attempts, each queued in the stopped Redis
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        time.sleep(2)
        send(settings, events[8:])
        out = collect(settings, settings.topic_recommendations, 0,
                      until_ids={e.event_id for e in events}, settle=1.0)
        assert any(r["degraded"] for r in out)  # the stall was seen
        client = redis_client(url, None, 5.0, asyncio_client=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and client.llen(hist_key(user)) < len(events):
            time.sleep(0.3)
        history = [entry.decode() for entry in client.lrange(hist_key(user), 0, -1)]
        client.close()
        assert history == [e.item_id for e in events]
    finally:
        redis.stop()


def poll_health(port: int, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                seen.append((r.status, json.loads(r.read())))
        except urllib.error.HTTPError as exc:
            seen.append((exc.code, json.loads(exc.read())))
        except OSError:
            pass
        time.sleep(0.05)


def test_a_poison_record_is_dead_lettered_and_a_crashing_agent_ends_the_worker(
        stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle, max_consecutive_failures=3)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings, argv=("tests/faulty_worker.py",))
    items = load_bundle(quick_bundle).items.item_ids[:6]
    good = make_events(6, items=items)
    poison = Event("poison-1", "user1", items[0], "click", int(time.time() * 1000))
    send(settings, good[:3] + [poison] + good[3:])
    out = collect(settings, settings.topic_recommendations, 0, until_ids={e.event_id for e in good})
    assert {r["event_id"] for r in out} >= {e.event_id for e in good}
    [dead] = collect(settings, settings.topic_dlq, 1, settle=1.0)
    assert dead["reason"] == "processing_failed" and "injected fault" in dead["detail"]
    assert json.loads(dead["payload"])["event_id"] == "poison-1"
    assert worker.proc.poll() is None

    seen, stop = [], threading.Event()
    poller = threading.Thread(target=poll_health, args=(int(worker.env["WEB_PORT"]), seen, stop))
    poller.start()
    try:
        time.sleep(0.5)
        send(settings, [Event(f"poison-{i}", "user2", items[1], "click", int(time.time() * 1000))
                        for i in range(2, 5)])
        code = worker.proc.wait(60)
    finally:
        stop.set()
        poller.join()
    assert code == 70, worker.tail()
    assert seen and seen[0][0] == 200
    failing = [body for status, body in seen if status == 503]
    assert failing and failing[0]["ok"] is False and "crashed" in failing[0]["agent"]
    assert "3 records in a row" in worker.tail(20_000)


def test_a_header_key_that_is_not_utf8_stops_nothing(stack, quick_bundle, workers):
    """The broker takes any bytes as a header key; aiokafka's strict decoding of one stopped
    the worker for every user, again after each restart. Read as Java reads it (U+FFFD): the
    event is served, a bad value is dead-lettered with its reason, the records around both
    are served."""
    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:6]
    before, after = make_events(4, items=items), make_events(4, items=items)
    send(settings, before)
    hostile = Event("bad-header", "hb-user", items[0], "click", int(time.time() * 1000))
    lines = [{"key": "hb-user", "value": hostile.to_json().decode(), "header_key_hex": "fffe69"},
             {"key": "hb-user", "value": "not json", "header_key_hex": "c3"}]
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "raw_headers_producer.py"),
                           stack["kafka"], settings.topic_events],
                          input="\n".join(map(json.dumps, lines)), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    send(settings, after)

    wanted = {e.event_id for e in before + after} | {"bad-header"}
    out = collect(settings, settings.topic_recommendations, 0, until_ids=wanted)
    assert {r["event_id"] for r in out} == wanted
    [dead] = collect(settings, settings.topic_dlq, 1, settle=1.0)
    assert dead["reason"] == "invalid_json" and dead["payload"] == "not json"
    assert worker.proc.poll() is None


def test_with_a_control_secret_an_unsigned_forget_erases_nobody(stack, quick_bundle, workers,
                                                                 redis_sync):
    """Where event producers can write the control topic too (no ACL, shared credentials),
    CONTROL_SECRET still keeps them from erasing anyone; the signed forget of the CLI works."""
    settings = unique_settings(stack, quick_bundle, control_secret="test-secret")
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:6]
    user = "signed-user"
    send(settings, user_events(user, items, 3, "s"))
    collect(settings, settings.topic_recommendations, 3)
    prod = producer(settings, stack["kafka"])
    prod.produce(settings.topic_control, key=user.encode(), value=forget_record(user, "attacker"))
    prod.produce(settings.topic_control, key=user.encode(),
                 value=forget_record(user, "attacker", secret="a-guess"))
    assert prod.flush(30) == 0
    dlq = collect(settings, settings.topic_dlq, 2, settle=1.0)
    assert sorted(d["reason"] for d in dlq) == ["bad_signature", "unsigned_control"]
    assert redis_sync.llen(hist_key(user)) == 3
    assert [r for r in changelog_records(settings) if r[1] == user][-1][2]["n_events"] == 3

    done = subprocess.run([sys.executable, "-m", "streams", "forget", user, "--requester", "dpo"],
                          env=settings_env(settings), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    while True:
        last = [r for r in changelog_records(settings, settle=0.5) if r[1] == user][-1]
        if last[2] is None or time.monotonic() > deadline:
            break
    assert last[2] is None  # the worker applied the signed forget: its tombstone


def test_batches_in_every_compression_kafka_offers_are_read(stack, quick_bundle, workers):
    """A producer's compression is its own choice: a batch in any of Kafka's codecs is read
    (without a codec library, aiokafka's fetcher raised on it and stopped the worker)."""
    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    items = load_bundle(quick_bundle).items.item_ids[:6]
    sent = set()
    for codec in ("gzip", "snappy", "lz4", "zstd"):
        events = make_events(3, items=items, prefix=codec)
        prod = producer(settings, stack["kafka"], **{"compression.type": codec})
        for event in events:
            prod.produce(settings.topic_events, key=event.user_id.encode(), value=event.to_json())
        assert prod.flush(30) == 0
        sent |= {e.event_id for e in events}
    out = collect(settings, settings.topic_recommendations, 0, until_ids=sent)
    assert {r["event_id"] for r in out} == sent
    assert worker.proc.poll() is None
