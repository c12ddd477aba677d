"""Test helpers over real Kafka: produce events, collect what comes out."""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import orjson

from streams.bundle import MANIFEST
from streams.events import Event
from streams.kafka.clients import consumer, ensure_topics, producer


def make_events(n: int, users: int = 5, items=("1", "2", "3", "4", "5", "6", "7", "8"),
                prefix: str | None = None, ts: int | None = None) -> list[Event]:
    prefix = prefix or uuid.uuid4().hex[:6]
    now = ts or int(time.time() * 1000)
    return [Event(f"{prefix}-{i}", f"user{i % users}", items[(i * 7 + i // users) % len(items)],
                  "click", now + i) for i in range(n)]


def send(settings, events=(), raw=()) -> None:
    """Produce Event objects (keyed by user) and raw byte payloads to the events topic."""
    prod = producer(settings, settings.kafka_bootstrap_servers)
    for event in events:
        prod.produce(settings.topic_events, key=event.user_id.encode(), value=event.to_json())
    for payload in raw:
        prod.produce(settings.topic_events, key=b"raw", value=payload)
    assert prod.flush(30) == 0


def collect(settings, topic: str, count: int, timeout: float = 60.0, settle: float = 0.0,
            until_ids: set | None = None, where: bool = False) -> list[dict]:
    """Read `topic` from the beginning until `count` records, or with `until_ids` until a record
    for each of those event ids (duplicates do not count towards them); then `settle` seconds.
    With `where`, each record also holds its "_partition" and "_offset"."""
    ensure_topics(settings, settings.kafka_bootstrap_servers)
    cons = consumer(settings, settings.kafka_bootstrap_servers, f"collect-{uuid.uuid4().hex[:8]}")
    cons.subscribe([topic])
    out, deadline, extra_until = [], time.monotonic() + timeout, None
    missing = set(until_ids or ())
    try:
        while time.monotonic() < deadline:
            msg = cons.poll(0.2)
            if msg is not None and not msg.error():
                out.append(orjson.loads(msg.value()))
                if where:
                    out[-1].update(_partition=msg.partition(), _offset=msg.offset())
                if until_ids is not None:
                    missing.discard(out[-1].get("event_id"))
            done = not missing if until_ids is not None else len(out) >= count
            if done and extra_until is None:
                extra_until = time.monotonic() + settle
            if extra_until is not None and time.monotonic() >= extra_until:
                break
    finally:
        cons.close()
    return out


def copy_bundle(src: Path, dst: Path, version: str, corrupt: str | None = None) -> Path:
    """A copy of `src` published as `version`; with `corrupt`, that file no longer matches its
    checksum."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["version"] = version
    (dst / MANIFEST).write_text(json.dumps(manifest))
    if corrupt:
        with open(dst / corrupt, "ab") as f:
            f.write(b"\0")
    return dst
