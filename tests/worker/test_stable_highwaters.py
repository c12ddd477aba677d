"""`streams.worker.stable_highwaters`: exactly-once recovery asks the broker where a changelog
partition ends. The first test guards the patch: once Faust stops answering from aiokafka's
cached last stable offset, it fails and the patch can go."""
import asyncio
from types import SimpleNamespace

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from streams.worker import stable_highwaters

TPS = ["changelog-0", "changelog-1"]


class FakeAIOKafkaConsumer:
    """A read_committed consumer just assigned: no fetch yet, so no cached stable offset."""

    def last_stable_offset(self, tp):
        return None

    async def end_offsets(self, partitions):
        return {tp: 40 + i for i, tp in enumerate(partitions)}  # the broker's answer


def thread(in_transaction: bool):
    return SimpleNamespace(consumer=SimpleNamespace(in_transaction=in_transaction),
                           _ensure_consumer=FakeAIOKafkaConsumer)


def test_faust_still_answers_exactly_once_from_the_cached_last_stable_offset():
    answer = asyncio.run(stable_highwaters._original(thread(True), TPS))
    assert answer == {"changelog-0": None, "changelog-1": None}  # "nothing to recover"


def test_the_replacement_asks_the_broker_in_both_modes():
    for in_transaction in (True, False):
        answer = asyncio.run(stable_highwaters._highwaters_from_the_broker(
            thread(in_transaction), TPS))
        assert answer == {"changelog-0": 40, "changelog-1": 41}


def test_the_worker_app_installs_it():
    from streams.worker import app  # noqa: F401  (create_app installs the patches)

    assert AIOKafkaConsumerThread._highwaters is stable_highwaters._highwaters_from_the_broker
