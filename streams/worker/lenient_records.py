"""aiokafka's record reader, made to read header keys that are not UTF-8 as Java's client does.

A Kafka header key is a string, but the broker does not check its encoding: any producer can
write a record whose header key is not UTF-8. aiokafka decodes keys strictly, so such a record
raises `UnicodeDecodeError` inside the consumer's fetch; Faust's fetcher crashes and the worker
stops for every user, and again after each restart, since the record is never consumed.
Java's client decodes with replacement characters (U+FFFD) and reads on; so do we.

`install()` replaces `aiokafka.consumer.fetcher.MemoryRecords` (the fetch response's batch
reader) with `LenientMemoryRecords`: the same compiled batches, and only a batch whose records
fail to decode is read again from that record on by aiokafka's pure-Python reader, with
header keys decoded leniently. The records before it are not read twice. Private names used:
`fetcher.MemoryRecords`, `_DefaultRecordBatchPy`, its `_maybe_uncompress` and `_buffer`
(`tests/worker/test_lenient_records.py` fails if an upgrade moves them or fixes the decoding).
"""
from __future__ import annotations

import struct

import aiokafka.consumer.fetcher as fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords

_LOG_OVERHEAD = struct.calcsize(">qi")  # a batch's base offset and length, before its bytes
_MAGIC_AT = struct.calcsize(">qii")


class _LenientText(bytearray):
    """A header key's bytes: decoded with U+FFFD for what is not UTF-8."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytearray.decode(self, encoding, "replace")


class _LenientBuffer(bytearray):
    """A batch's records whose slices decode leniently (the reader slices each header key)."""

    def __getitem__(self, index):
        part = bytearray.__getitem__(self, index)
        return _LenientText(part) if isinstance(index, slice) else part


def _lenient_records(data: bytes, skip: int):
    """The records of one v2 batch after the first `skip`, header keys decoded leniently."""
    batch = _DefaultRecordBatchPy(data)
    batch._maybe_uncompress()
    batch._buffer = _LenientBuffer(batch._buffer)
    for i, record in enumerate(batch):
        if i >= skip:
            yield record


class _LenientBatch:
    """One batch as aiokafka reads it (compiled), re-read leniently from a failing record on."""

    def __init__(self, batch, data: memoryview):
        self._batch, self._data = batch, data  # copied only if it is ever re-read
        self._records = None
        self._read = 0

    def __getattr__(self, name):  # base_offset, is_control_batch, validate_crc, ...
        return getattr(self._batch, name)

    def __iter__(self):
        return self

    def __next__(self):
        if self._records is None:
            self._records = iter(self._batch)
        try:
            record = next(self._records)
        except UnicodeDecodeError:  # a header key: only v2 batches have headers
            self._records = _lenient_records(bytes(self._data), self._read)
            record = next(self._records)
        self._read += 1
        return record


class LenientMemoryRecords:
    """A fetch response's batches (aiokafka's reader), each able to re-read itself leniently."""

    def __init__(self, data: bytes):
        self._records = MemoryRecords(data)
        self._data = memoryview(data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self):
        batch = self._records.next_batch()
        if batch is None:
            return None
        # the same framing as aiokafka's reader: base offset (8), length (4), then the batch
        length = struct.unpack_from(">i", self._data, self._pos + 8)[0]
        end = self._pos + _LOG_OVERHEAD + length
        data, self._pos = self._data[self._pos:end], end
        return _LenientBatch(batch, data) if data[_MAGIC_AT] >= 2 else batch


def install() -> None:
    """Make every aiokafka consumer in this process read such records (idempotent)."""
    fetcher.MemoryRecords = LenientMemoryRecords
