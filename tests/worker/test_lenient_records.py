"""The lenient record reader (`streams.worker.lenient_records`): a header key that is not UTF-8
reads as U+FFFD, the batch's other records are read once each, in order. The first test guards
the patch: once aiokafka reads such records itself, it fails and the patch can go."""
import aiokafka.consumer.fetcher as fetcher
import pytest
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition
from raw_header_key import RawKey

from streams.worker import lenient_records
from streams.worker.lenient_records import LenientMemoryRecords

TP = TopicPartition("events", 0)
GZIP = DefaultRecordBatch.CODEC_GZIP


def batch_bytes(base_offset: int, records, compression: int = 0) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(magic=2, compression_type=compression,
                                           is_transactional=0, producer_id=-1, producer_epoch=-1,
                                           base_sequence=-1, batch_size=1 << 20)
    for i, (value, headers) in enumerate(records):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=b"u", value=value, headers=headers)
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")
    return bytes(data)


def fetch(records_type, data: bytes) -> list:
    parts = fetcher.PartitionRecords(TP, records_type(data), [], 0, None, None, True,
                                     fetcher.READ_UNCOMMITTED)
    return list(parts)


RECORDS = [(b"one", [("trace", b"1")]), (b"two", [(RawKey(b"\xff\xfeid"), b"2")]),
           (b"three", [])]


def test_aiokafka_still_fails_on_a_header_key_that_is_not_utf8():
    with pytest.raises(UnicodeDecodeError):
        fetch(MemoryRecords, batch_bytes(0, RECORDS))


@pytest.mark.parametrize("compression", [0, GZIP])
def test_a_bad_header_key_reads_as_replacement_characters_and_no_record_is_lost(compression):
    data = batch_bytes(0, RECORDS, compression) + batch_bytes(3, [(b"four", [("a", b"4")])])
    out = fetch(LenientMemoryRecords, data)
    assert [(r.offset, r.value) for r in out] == [(0, b"one"), (1, b"two"), (2, b"three"),
                                                  (3, b"four")]
    assert out[1].headers == (("\ufffd\ufffdid", b"2"),)
    assert out[0].headers == (("trace", b"1"),) and out[3].headers == (("a", b"4"),)


def test_good_batches_read_as_aiokafka_reads_them():
    data = batch_bytes(0, [(b"x", [("h", b"v")])] * 3) + batch_bytes(3, [(b"y", [])])
    plain, lenient = fetch(MemoryRecords, data), fetch(LenientMemoryRecords, data)
    assert [(r.offset, r.value, r.headers) for r in lenient] == [
        (r.offset, r.value, r.headers) for r in plain]


def test_install_replaces_the_fetchers_reader():
    original = fetcher.MemoryRecords
    try:
        lenient_records.install()
        assert fetcher.MemoryRecords is LenientMemoryRecords
    finally:
        fetcher.MemoryRecords = original
