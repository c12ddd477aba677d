"""The offsets a fetch steps over (`streams.worker.skipped_offsets`): markers and aborted
records are reported as runs with no record, the records themselves read as aiokafka reads
them. These tests build the batches a broker sends and read them with the fetcher's reader;
they fail if an upgrade of aiokafka moves the reader's private names the patch relies on."""
import struct

import aiokafka.consumer.fetcher as fetcher
import pytest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from streams.worker import skipped_offsets
from streams.worker.skipped_offsets import GapReportingPartitionRecords

TP = TopicPartition("events", 0)
COMMIT, ABORT = 1, 0
_ATTRIBUTES_AT = struct.calcsize(">qiibI")
_CRC_AT = struct.calcsize(">qiib")


def batch(base_offset: int, values, producer_id: int = 7) -> bytes:
    """A transactional batch of `values` (one record each) from `producer_id`."""
    builder = _DefaultRecordBatchBuilderPy(magic=2, compression_type=0, is_transactional=1,
                                           producer_id=producer_id, producer_epoch=0,
                                           base_sequence=0, batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=b"u", value=value, headers=[])
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")
    return bytes(data)


def marker(offset: int, kind: int, producer_id: int = 7) -> bytes:
    """A commit or abort marker: a control batch of one record, as the broker writes it."""
    builder = _DefaultRecordBatchBuilderPy(magic=2, compression_type=0, is_transactional=1,
                                           producer_id=producer_id, producer_epoch=0,
                                           base_sequence=-1, batch_size=1 << 20)
    builder.append(0, timestamp=1_700_000_000_000, key=struct.pack(">hh", 0, kind),
                   value=struct.pack(">hi", 0, 0), headers=[])
    data = bytearray(builder.build())
    data[0:8] = offset.to_bytes(8, "big")
    attributes = struct.unpack_from(">h", data, _ATTRIBUTES_AT)[0] | 0x20  # control batch
    struct.pack_into(">h", data, _ATTRIBUTES_AT, attributes)
    struct.pack_into(">I", data, _CRC_AT, calc_crc32c(bytes(data[_ATTRIBUTES_AT:])))
    return bytes(data)


def read(data: bytes, isolation: int, aborted=(), fetch_offset: int = 0,
         reader=GapReportingPartitionRecords) -> tuple[list[int], list]:
    skipped_offsets.drain()
    parts = reader(TP, MemoryRecords(data), list(aborted), fetch_offset, None, None, True,
                   isolation)
    offsets = [r.offset for r in parts]
    return offsets, skipped_offsets.drain()


def test_markers_between_and_after_the_records_are_reported():
    data = (batch(0, [b"a", b"b", b"c"]) + marker(3, COMMIT) + batch(4, [b"d", b"e"])
            + marker(6, COMMIT))
    offsets, skipped = read(data, fetcher.READ_UNCOMMITTED)
    assert offsets == [0, 1, 2, 4, 5]
    assert skipped == [(TP, 3, 4), (TP, 6, 7)]


def test_an_aborted_transaction_read_committed_is_one_run_with_its_marker():
    data = (batch(0, [b"x", b"y"], producer_id=8) + marker(2, ABORT, producer_id=8)
            + batch(3, [b"a", b"b"]) + marker(5, COMMIT))
    offsets, skipped = read(data, fetcher.READ_COMMITTED, aborted=[(8, 0)])
    assert offsets == [3, 4]
    assert skipped == [(TP, 0, 3), (TP, 5, 6)]
    # read_uncommitted delivers the aborted records: only the markers are skipped
    offsets, skipped = read(data, fetcher.READ_UNCOMMITTED)
    assert offsets == [0, 1, 3, 4] and skipped == [(TP, 2, 3), (TP, 5, 6)]


def test_the_records_read_as_aiokafka_reads_them_and_a_fetch_mid_batch_reports_nothing_before_it():
    data = batch(0, [b"a", b"b", b"c"]) + marker(3, COMMIT) + batch(4, [b"d"])
    aiokafkas = GapReportingPartitionRecords.__bases__[0]
    plain, _ = read(data, fetcher.READ_COMMITTED, reader=aiokafkas)
    offsets, skipped = read(data, fetcher.READ_COMMITTED, fetch_offset=1)
    assert plain == [0, 1, 2, 4] and offsets == [1, 2, 4]
    assert skipped == [(TP, 3, 4)]


def test_a_read_dropped_half_way_reports_nothing_beyond_what_it_yielded():
    skipped_offsets.drain()
    data = batch(0, [b"a"]) + marker(1, COMMIT) + batch(2, [b"b"]) + marker(3, COMMIT)
    parts = GapReportingPartitionRecords(TP, MemoryRecords(data), [], 0, None, None, True,
                                         fetcher.READ_COMMITTED)
    assert next(parts).offset == 0
    del parts
    assert skipped_offsets.drain() == []


def test_install_replaces_the_fetchers_partition_reader():
    original = fetcher.PartitionRecords
    try:
        skipped_offsets.install()
        assert fetcher.PartitionRecords is GapReportingPartitionRecords
    finally:
        fetcher.PartitionRecords = original


@pytest.mark.parametrize("frontier_inside", [True, False])
def test_a_skipped_run_counts_as_done(frontier_inside):
    from streams.worker.offsets import OffsetLedger

    ledger = OffsetLedger()
    ledger.assign(TP, 10 if frontier_inside else 5, now=0.0)
    ledger.no_record(TP, 10, 100_000, now=1.0)  # a long aborted transaction
    ledger.mark_done(TP, [*range(5, 10), 100_000], now=1.0)
    assert ledger.due([TP]) == {TP: 100_001}
    assert ledger.holes(now=100.0, older_than_s=1.0) == {}
