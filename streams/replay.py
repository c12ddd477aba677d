"""Recorded event streams: MovieLens u.data and generic CSV/JSONL logs, in timestamp order.

Event ids are deterministic (derived from user, item and original time), so a stream
replayed twice is recognised as the same events by the worker's de-duplication.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path
from typing import Iterator

import orjson

from .events import Event

log = logging.getLogger(__name__)


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
    with open(path, encoding="utf-8") as handle:
        rows = (orjson.loads(line) for line in handle if line.strip()) \
            if path.suffix in (".jsonl", ".ndjson") else csv.DictReader(handle)
        for row in rows:
            user, item = str(row["user_id"]), str(row["item_id"])
            ts = _to_ms(row.get("ts", row.get("timestamp")))
            event_type = str(row.get("event_type") or "click")
            event_id = str(row.get("event_id") or _event_id("ev", user, item, ts, event_type))
            yield Event(event_id, user, item, event_type, ts)


def read_recorded(path: str | Path, limit: int | None = None, start_ms: int | None = None,
                  end_ms: int | None = None) -> Iterator[Event]:
    """Events of a recorded stream, ordered by ts (stable), optionally windowed and limited."""
    path = Path(path)
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
