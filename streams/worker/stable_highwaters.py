"""Exactly-once table recovery reads up to the broker's last stable offset, not a cached one.

faust-streaming 0.15.3 asks a read_committed consumer for a changelog partition's end with
aiokafka's `last_stable_offset(tp)`, a value taken from the last fetch response: None for a
partition not fetched since it was assigned, stale for one fetched earlier. Recovery then
counts a freshly assigned partition as recovered (None reads as "empty") and the agent
processes its events over an empty or old state: in the fault suite a user's state went from 5
events back to 2. The broker answers a ListOffsets request from a read_committed consumer with
the last stable offset itself, which is what `end_offsets` sends; the replacement asks that in
both modes.

Replaces `faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._highwaters` (private);
`tests/worker/test_stable_highwaters.py` fails once Faust stops reading `last_stable_offset`
there or moves the method.
"""
from __future__ import annotations

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

_original = AIOKafkaConsumerThread._highwaters


async def _highwaters_from_the_broker(self, partitions):
    """The partitions' ends as the broker gives them to this consumer's isolation level."""
    return await self._ensure_consumer().end_offsets(partitions)


def install() -> None:
    AIOKafkaConsumerThread._highwaters = _highwaters_from_the_broker
