"""The event schema and its validation.

`decode_event` never raises on input: it returns an `Event` or a `Rejection` with a reason
that goes to the dead-letter topic together with the original bytes.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Container, Mapping

import orjson

MAX_ID_LEN = 128
REQUIRED = ("event_id", "user_id", "item_id", "event_type", "ts")


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
    if raw is None:
        return Rejection("empty_payload", "the record has no value")
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
        value = obj[name]
        text = _as_id(value)
        if text is None:
            return Rejection(
                "wrong_type", f"{name} must be a non-empty string or integer, got {value!r:.60}"
            )
        ids[name] = text
    event_type = obj["event_type"]
    if not isinstance(event_type, str):
        return Rejection("wrong_type", f"event_type must be a string, got {event_type!r:.60}")
    if event_type not in rules.event_types:
        return Rejection("unknown_event_type", f"event_type {event_type!r:.60} is not accepted")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return Rejection("wrong_type", f"ts must be epoch milliseconds, got {ts!r:.60}")
    if ts < 0:
        return Rejection("invalid_ts", f"ts {ts} is negative")
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
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and value.isprintable():
        return value
    return None


def dlq_record(
    rejection: Rejection, payload: bytes | None, topic: str, partition: int, offset: int, ts_ms: int
) -> bytes:
    """The `events.dlq` message: reason, original bytes (text when UTF-8, else base64), origin."""
    if payload is None:
        body, encoding = None, "none"
    else:
        try:
            body, encoding = payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "payload": body,
            "payload_encoding": encoding,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "ts": ts_ms,
        }
    )


def parse_control(raw: bytes | None) -> str | None:
    """A privacy control record on the events topic: {"control": "forget", "user_id": U} -> U.

    It travels in the user's partition, so it is applied after the user's earlier events and
    before their later ones.
    """
    if not raw or len(raw) > 1024 or b'"control"' not in raw:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and obj.get("control") == "forget":
        return _as_id(obj.get("user_id"))
    return None


def forget_record(user_id: str) -> bytes:
    return orjson.dumps({"control": "forget", "user_id": user_id})
