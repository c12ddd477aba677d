"""The offsets a fetch stepped over: log positions that hold no record this consumer delivers.

A transactional producer leaves a commit or abort marker after each transaction, and a
read_committed consumer (exactly-once) also skips an aborted transaction's records. Nothing
is processed at those offsets, yet the commit frontier (`streams.worker.offsets`) may pass
them only once it knows they hold nothing. Left to the hole check (HOLE_CHECK_S reads the
log there), the committed offsets of an upstream that writes in transactions would stay up
to 20 s behind, and exactly-once would publish again, after a crash, the records behind each
marker it has not resolved yet.

aiokafka's fetcher knows, as it reads a fetched partition's batches, which offsets it steps
over. `install()` replaces `aiokafka.consumer.fetcher.PartitionRecords` (the reader of one
partition's fetched batches) with `GapReportingPartitionRecords`: the same records, in the
same order, and each run of offsets between them (or after the last, up to the position the
next fetch starts from) reported to `drain()`. A run is reported only once the reader has
read past it, and only from a reader that reaches it: a fetch dropped half-way (a seek, a
revoke) reports nothing beyond what it yielded. Private names used: `fetcher.PartitionRecords`,
its `_tp`, `_unpack_records` and `next_fetch_offset` (`tests/worker/test_skipped_offsets.py`
fails if an upgrade moves them).

The fetcher runs in the consumer's thread; the committer drains on the event loop. A run is
queued before the record after it is handed on, so it is there when that record's batch is
committed.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable

import aiokafka.consumer.fetcher as fetcher

# (tp, first offset, end offset) runs not yet drained; bounded so that a process without a
# committer draining it does not grow (a run dropped falls back to the hole check)
_skipped: deque[tuple[Hashable, int, int]] = deque(maxlen=100_000)


def drain() -> list[tuple[Hashable, int, int]]:
    """The runs of offsets stepped over since the last call, oldest first (the consumer's
    thread may append meanwhile: those wait for the next call)."""
    return [_skipped.popleft() for _ in range(len(_skipped))]


class GapReportingPartitionRecords(fetcher.PartitionRecords):
    """aiokafka's reader of one partition's fetched batches, reporting the offsets it skips."""

    def _unpack_records(self):
        tp, expected = self._tp, self.next_fetch_offset  # the fetch's first offset
        for record in super()._unpack_records():
            if record.offset > expected:
                _skipped.append((tp, expected, record.offset))
            expected = record.offset + 1
            yield record
        if self.next_fetch_offset > expected:  # markers (or aborted records) at the end
            _skipped.append((tp, expected, self.next_fetch_offset))


def install() -> None:
    """Make every aiokafka consumer in this process report what it skips (idempotent)."""
    fetcher.PartitionRecords = GapReportingPartitionRecords
