"""Recorded event streams: MovieLens u.data and generic CSV/JSONL logs, in timestamp order.

Event ids are deterministic (derived from user, item and original time), so a stream
replayed twice is recognised as the same events by the worker's de-duplication.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Iterator

import orjson

from streams.errors import InterestStreamError
from streams.events import Event

log = logging.getLogger(__name__)
GENERIC_COLUMNS = "user_id, item_id, ts (or timestamp); optional event_type, event_id"


class RecordingError(InterestStreamError):
    """A recorded stream cannot be read: missing file, or not an event log."""


def _event_id(prefix: str, user: str, item: str, ts_ms: int, event_type: str) -> str:
    digest = hashlib.blake2b(f"{user}|{item}|{ts_ms}|{event_type}".encode(), digest_size=8)
    return f"{prefix}-{digest.hexdigest()}"


def _to_ms(value) -> int:
    ts = float(value)
    return int(ts if ts > 1e11 else ts * 1000)  # seconds or milliseconds


def _movielens_rows(path: Path) -> Iterator[Event]:
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) != 4:
                continue
            user, item, ts = parts[0], parts[1], int(parts[3]) * 1000
            yield Event(_event_id("ml", user, item, ts, "rating"), user, item, "rating", ts)


def _generic_rows(path: Path) -> Iterator[Event]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        jsonl = path.suffix in (".jsonl", ".ndjson")
        rows = _json_lines(path, handle) if jsonl else csv.DictReader(handle)
        for number, row in enumerate(rows, start=1 if jsonl else 2):
            try:
                user, item = str(row["user_id"]), str(row["item_id"])
                ts = _to_ms(row.get("ts", row.get("timestamp")))
            except (KeyError, TypeError, ValueError, AttributeError):
                found = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise RecordingError(
                    f"{path} line {number} is not an event: expected {GENERIC_COLUMNS}; "
                    f"found {found[:200] or 'nothing'}") from None
            event_type = str(row.get("event_type") or "click")
            event_id = str(row.get("event_id") or _event_id("ev", user, item, ts, event_type))
            yield Event(event_id, user, item, event_type, ts)


def _json_lines(path: Path, handle) -> Iterator[dict]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            raise RecordingError(f"{path} line {number} is not JSON: {line[:80]!r}") from None


def read_recorded(path: str | Path, limit: int | None = None, start_ms: int | None = None,
                  end_ms: int | None = None) -> Iterator[Event]:
    """Events of a recorded stream, ordered by ts (stable), optionally windowed and limited."""
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"{path}: no such file (a MovieLens u.data, or a CSV/JSONL log "
                             f"with {GENERIC_COLUMNS})")
    rows = _movielens_rows(path) if path.name == "u.data" or path.suffix == ".data" \
        else _generic_rows(path)
    events = sorted(rows, key=lambda e: e.ts)
    count = 0
    for event in events:
        if start_ms is not None and event.ts < start_ms:
            continue
        if end_ms is not None and event.ts >= end_ms:
            break
        if limit is not None and count >= limit:
            break
        count += 1
        yield event


def parse_time(value: str | None) -> int | None:
    """epoch seconds/ms or an ISO date -> epoch ms."""
    if value is None:
        return None
    try:
        return _to_ms(value)
    except ValueError:
        from datetime import datetime, timezone

        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return int(parsed.timestamp() * 1000)


class Pacer:
    """When to send the next event: X times real time (`speed`), N events/s (`rate`), or at once."""

    def __init__(self, speed: float | None = None, rate: float | None = None,
                 max_gap_s: float = 5.0):
        self.speed, self.rate, self.max_gap_s = speed, rate, max_gap_s
        self.virtual = 0.0  # seconds since start on the replay clock
        self.previous_ts: int | None = None

    def delay_for(self, ts_ms: int, sent: int) -> float:
        """Seconds after the start at which this event is due."""
        if self.rate:
            return sent / self.rate
        if self.speed:
            if self.previous_ts is not None:
                gap = max(0.0, (ts_ms - self.previous_ts) / 1000.0) / self.speed
                self.virtual += min(gap, self.max_gap_s)  # long silences compressed
            self.previous_ts = ts_ms
            return self.virtual
        return 0.0


def replay(events, send, pacer: Pacer, restamp: bool = True, progress=None,
           clock=time.monotonic, sleep=time.sleep) -> dict:
    """Send `events` through `send(event)` at the pacer's times; returns a summary."""
    start, sent, errors = clock(), 0, 0
    for event in events:
        wait = start + pacer.delay_for(event.ts, sent) - clock()
        if wait > 0:
            sleep(wait)
        if restamp:
            event = dataclasses.replace(event, ts=int(time.time() * 1000))
        try:
            send(event)
            sent += 1
        except Exception as exc:  # KafkaException and the like: counted, replay goes on
            errors += 1
            log.warning("send failed: %s", exc)
        if progress is not None:
            progress.update(1)
    elapsed = max(clock() - start, 1e-9)
    return {"sent": sent, "errors": errors, "seconds": round(elapsed, 3),
            "rate": round(sent / elapsed, 1)}
