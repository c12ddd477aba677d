"""Record a topic to JSONL: one line per record, the JSON value as it was.

A value that is not a JSON object is kept as {"_raw_b64": ..., "_key": ...}; replaying a
recording of `events` (python -m streams replay FILE --keep-ts) reproduces the same input.
"""
from __future__ import annotations

import base64
import logging
import time
import uuid
from pathlib import Path

import orjson

log = logging.getLogger(__name__)


def record_line(key: bytes | None, value: bytes | None) -> bytes:
    try:
        obj = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        obj = {"_raw_b64": base64.b64encode(value or b"").decode(),
               "_key": key.decode(errors="replace") if key else None}
    return orjson.dumps(obj) + b"\n"


def record(cons, topic: str, out: Path, limit: int | None = None, idle_timeout_s: float = 5.0,
           progress=None) -> int:
    """Write records of `topic` to `out` until `limit` or `idle_timeout_s` without records."""
    cons.subscribe([topic])
    written, last = 0, time.monotonic()
    with open(out, "wb") as handle:
        while limit is None or written < limit:
            msg = cons.poll(0.2)
            if msg is None or msg.error():
                if time.monotonic() - last > idle_timeout_s:
                    break
                continue
            last = time.monotonic()
            handle.write(record_line(msg.key(), msg.value()))
            written += 1
            if progress is not None:
                progress.update(1)
    cons.close()
    return written


def group_id() -> str:
    return f"record-{uuid.uuid4().hex[:8]}"
