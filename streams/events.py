"""The event schema, its validation, and the dead-letter and control records.

`decode_event` never raises on input: it returns an `Event` or a `Rejection` with a reason
that goes to the dead-letter topic together with the original bytes. `check_routing` rejects
an event that did not arrive where its user's state lives (key and partition).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Container, Mapping, Sequence

import orjson
from aiokafka.partitioner import murmur2

MAX_ID_LEN = 128
REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts")
# Before 1973-03-03 in milliseconds: a ts below it is almost surely in seconds (or 0). Recorded
# logs as old as MovieLens-100K's (1997) stay valid.
MIN_TS_MS = 100_000_000_000
# A dead-letter record keeps at most this much of the input's value, key and headers, so it
# stays far below the producer's 1 MB request limit whatever the input (JSON escaping of
# control characters multiplies text by up to 6, base64 by 4/3).
DLQ_PAYLOAD_CAP = 64 * 1024
DLQ_KEY_CAP = 1024
DLQ_HEADERS_CAP = 64 * 1024
HEADER_FRAMING = 10  # a header's two length varints, counted generously


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts: int  # epoch milliseconds

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "event_id": self.event_id,
                "user_id": self.user_id,
                "item_id": self.item_id,
                "event_type": self.event_type,
                "ts": self.ts,
            }
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # a short machine-readable code, e.g. "unknown_item"
    detail: str  # what a person needs to fix the producer


@dataclass(frozen=True)
class EventRules:
    """What a valid event looks like: accepted types, size and time limits, known items."""

    event_types: Container[str]
    known_items: Container[str] | None = None
    max_payload_bytes: int = 4096
    max_future_skew_ms: int = 300_000


def decode_event(raw: bytes | None, rules: EventRules, now_ms: int) -> Event | Rejection:
    """Parse and validate one `events` record. Never raises on bad input."""
    if not raw:
        return Rejection("empty_payload", "the record has no value (null or 0 bytes)")
    if len(raw) > rules.max_payload_bytes:
        return Rejection(
            "payload_too_large", f"{len(raw)} bytes > MAX_PAYLOAD_BYTES={rules.max_payload_bytes}"
        )
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        return Rejection("invalid_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    missing = [name for name in REQUIRED if name not in obj]
    if missing:
        return Rejection("missing_field", f"missing {', '.join(missing)}")
    return _validate_fields(obj, rules, now_ms)


def _validate_fields(obj: Mapping, rules: EventRules, now_ms: int) -> Event | Rejection:
    ids = {}
    for name in ("event_id", "user_id", "item_id"):
        text = _as_id(obj[name])
        if text is None:
            return _id_rejection(name, obj[name])
        ids[name] = text
    event_type = obj["event_type"]
    if not isinstance(event_type, str):
        return Rejection("wrong_type", f"event_type must be a string, got {event_type!r:.60}")
    if event_type not in rules.event_types:
        return Rejection("unknown_event_type", f"event_type {event_type!r:.60} is not accepted")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return Rejection("wrong_type", f"ts must be epoch milliseconds, got {ts!r:.60}")
    if ts < MIN_TS_MS:
        return Rejection("invalid_ts", f"ts {ts!r:.30} is before 1973-03-03: epoch milliseconds "
                                       "expected (is it in seconds?)")
    if ts > now_ms + rules.max_future_skew_ms:
        return Rejection("ts_in_future", f"ts {int(ts)} is ahead of now {now_ms}")
    if rules.known_items is not None and ids["item_id"] not in rules.known_items:
        return Rejection("unknown_item", f"item_id {ids['item_id']!r} is not in the model's catalog")
    return Event(ids["event_id"], ids["user_id"], ids["item_id"], event_type, int(ts))


def _as_id(value) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if (isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and value.isprintable()
            and not value.isspace()):
        return value
    return None


def _id_rejection(name: str, value) -> Rejection:
    """Why `value` is not an id, in the producer's terms."""
    if isinstance(value, str) and len(value) > MAX_ID_LEN:
        return Rejection("id_too_long", f"{name} has {len(value)} characters; at most {MAX_ID_LEN}")
    if isinstance(value, float) and value.is_integer():
        # JSON parsers read integers beyond 64 bits as floats: the id's digits are already lost.
        return Rejection("wrong_type", f"{name} is an integer beyond 64 bits; send it as a string")
    if isinstance(value, str) and value and value.isspace():
        return Rejection("wrong_type", f"{name} is blank (white space only)")
    if isinstance(value, str) and value:
        return Rejection("wrong_type", f"{name} has a control or non-printable character")
    return Rejection("wrong_type", f"{name} must be a non-empty string or integer, got {value!r:.60}")


@lru_cache(maxsize=1 << 17)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, Java's and aiokafka's) picks for `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def check_routing(event: Event, key: bytes | None, partition: int, partitions: int
                  ) -> Rejection | None:
    """None when the record is keyed by its user and sits in the user's partition, where the
    user's state lives; else why not. Taking it elsewhere would write the user's state into
    another changelog partition, from which a restart restores a stale copy."""
    user_key = event.user_id.encode()
    if key != user_key:
        shown = "no key" if key is None else f"key {key[:60]!r}"
        return Rejection("wrong_key", f"{shown}: an event must be keyed by its user_id "
                                      f"({user_key[:60]!r})")
    expected = partition_for(user_key, partitions)
    if partition != expected:
        return Rejection("wrong_partition",
                         f"in partition {partition}; user {event.user_id[:60]!r} belongs in "
                         f"{expected} (murmur2 of the key, Kafka's default partitioner: set it "
                         "on producers whose client defaults to another, e.g. librdkafka)")
    return None


def _excerpt(data: bytes, cap: int) -> tuple[str, str]:
    """Up to `cap` bytes of `data` as (text, "utf-8") when it is UTF-8, else (base64, "base64")."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data[:cap]).decode("ascii"), "base64"
    # valid as a whole: only a character cut at the end can be incomplete
    return data[:cap].decode("utf-8", errors="ignore"), "utf-8"


def dlq_record(rejection: Rejection, payload: bytes | None, topic: str, partition: int,
               offset: int, ts_ms: int, key: bytes | None = None) -> bytes:
    """The `events.dlq` message: reason, original bytes (text when UTF-8, else base64), origin.

    A value over DLQ_PAYLOAD_CAP bytes is cut to that size: `payload_truncated` says so, and
    `payload_size` and `payload_sha256` identify the original (which is still in the source
    topic at `topic`/`partition`/`offset` until its retention)."""
    record = {"reason": rejection.reason, "detail": rejection.detail}
    if payload is None:
        record.update(payload=None, payload_encoding="none")
    else:
        body, encoding = _excerpt(payload, DLQ_PAYLOAD_CAP)
        record.update(payload=body, payload_encoding=encoding, payload_size=len(payload),
                      payload_truncated=len(payload) > DLQ_PAYLOAD_CAP)
        if len(payload) > DLQ_PAYLOAD_CAP:
            record["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    if key is not None:
        key_text, key_encoding = _excerpt(key, DLQ_KEY_CAP)
        record.update(key=key_text, key_encoding=key_encoding, key_size=len(key))
    record.update(topic=topic, partition=partition, offset=offset, ts=ts_ms)
    return orjson.dumps(record)


def dlq_key(key: bytes | None) -> bytes | None:
    """The dead-letter record's key: the input's, cut to DLQ_KEY_CAP bytes."""
    return key if key is None or len(key) <= DLQ_KEY_CAP else key[:DLQ_KEY_CAP]


def dlq_headers(headers: Sequence | None) -> list[tuple[str, bytes]] | None:
    """The input's headers for the dead-letter record; dropped past DLQ_HEADERS_CAP bytes in
    all, each header counted with its framing, so that a flood of empty headers is bounded
    too (the record's `detail` does not say so: the source offset still has them)."""
    if not headers:
        return None
    out = [(str(name), bytes(value) if value is not None else b"") for name, value in headers]
    size = sum(len(name.encode("utf-8", "replace")) + len(value) + HEADER_FRAMING
               for name, value in out)
    return out if size <= DLQ_HEADERS_CAP else None


@dataclass(frozen=True, slots=True)
class Forget:
    """A privacy erasure read from the control topic."""

    user_id: str
    requester: str


def parse_control(raw: bytes | None, secret: str | None = None) -> Forget | Rejection:
    """A record of the control topic: {"control": "forget", "user_id": U, "requester": R}, and
    with a `secret` its "signature" (`control_signature`).

    Control records come only from the control topic (TOPIC_CONTROL), whose write access is
    meant for the privacy tooling alone: an `events` record is always read as an event. The
    signature keeps event producers from erasing users where that topic's ACL is missing or
    shared credentials let them write it anyway.
    """
    if not raw:
        return Rejection("invalid_control", "the control record has no value")
    if len(raw) > 4096:
        return Rejection("invalid_control", f"{len(raw)} bytes: a control record is small")
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        return Rejection("invalid_control", f"not JSON: {str(exc)[:200]}")
    if not isinstance(obj, dict) or obj.get("control") != "forget":
        return Rejection("invalid_control", 'expected {"control": "forget", "user_id": ...}')
    user = _as_id(obj.get("user_id"))
    if user is None:
        return Rejection("invalid_control", _id_rejection("user_id", obj.get("user_id")).detail)
    requester = obj.get("requester")
    requester = requester if isinstance(requester, str) and requester else "unknown"
    if secret:
        signature = obj.get("signature")
        if not isinstance(signature, str):
            return Rejection("unsigned_control", "CONTROL_SECRET is set: a forget must be signed "
                                                 "(python -m streams forget signs it)")
        if not hmac.compare_digest(signature, control_signature(secret, user, requester)):
            return Rejection("bad_signature", "the forget's signature does not match its user "
                                              "and requester under CONTROL_SECRET")
    return Forget(user, requester[:200])


def control_signature(secret: str, user_id: str, requester: str) -> str:
    """HMAC-SHA256 (hex) of the forget's user and requester under `secret`."""
    message = orjson.dumps(["forget", user_id, requester])
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def forget_record(user_id: str, requester: str = "unknown", secret: str | None = None) -> bytes:
    record = {"control": "forget", "user_id": user_id, "requester": requester}
    if secret:
        record["signature"] = control_signature(secret, user_id, requester)
    return orjson.dumps(record)
