"""Which input offsets may be committed: an offset is committed only when it and every offset
before it (from the partition's committed position) has been processed by this worker and its
outputs acknowledged by the broker.

Why not Faust's own ack bookkeeping: Faust 0.15 treats a jump in a partition's offsets as a
gap to skip, and drops any record below the last offset it read. Around a table recovery it
seeks a partition back to its committed offset while an older fetch is still being delivered,
so a partition's records can reach the agent as 47..81, 106.., then 47.. again: Faust counted
82..105 as acknowledged, dropped their redelivery and committed past them (events with no
output in the fault suite). This ledger never skips an offset it has not seen done; a real hole
in the log (a transaction marker) is confirmed by reading the log, not assumed.

Pure bookkeeping: `streams.worker.committer` wires it to the consumer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from operator import methodcaller
from typing import Hashable, Iterable

log = logging.getLogger(__name__)


@dataclass
class PartitionLedger:
    frontier: int | None = None  # every offset below it is done; None until assigned
    committed: int | None = None  # what this worker last committed (or found committed)
    done: set[int] = field(default_factory=set)  # done offsets at or above the frontier
    hole_since: float | None = None  # when `done` first held an offset beyond a missing one

    def advance(self, now: float) -> None:
        if self.frontier is None:
            return
        before = self.frontier
        while self.frontier in self.done:
            self.done.discard(self.frontier)
            self.frontier += 1
        if not self.done:
            self.hole_since = None
        elif self.hole_since is None or self.frontier != before:
            self.hole_since = now  # the frontier waits on a new missing offset


def _failed(future) -> bool:
    return future.cancelled() or future.exception() is not None


_done = methodcaller("done")


class OffsetLedger:
    """Per partition: the done offsets, the commit frontier, and records awaiting delivery."""

    def __init__(self) -> None:
        self.parts: dict[Hashable, PartitionLedger] = {}
        # processed records whose outputs are on their way: ((tp, offset), delivery futures)
        self.in_flight: list[tuple[tuple[Hashable, int], tuple]] = []
        self.in_flight_offsets: set[tuple[Hashable, int]] = set()

    def assign(self, tp: Hashable, committed: int, now: float) -> None:
        """The partition is ours from `committed` (the group's committed offset, or the log
        start when there is none). Offsets done earlier stay done: they were processed and
        delivered, whichever generation fetched them."""
        part = self.parts.setdefault(tp, PartitionLedger())
        part.frontier = part.committed = committed
        part.done = {o for o in part.done if o >= committed}
        part.advance(now)

    def seen(self, tp: Hashable, offset: int) -> bool:
        """True for a redelivery of a record already processed (skip it)."""
        if (tp, offset) in self.in_flight_offsets:
            return True
        part = self.parts.get(tp)
        if part is None:
            return False
        return (part.frontier is not None and offset < part.frontier) or offset in part.done

    def sent(self, tp: Hashable, offset: int, futures: Iterable = ()) -> None:
        """The record is processed; it is done once every future in `futures` succeeded."""
        key = (tp, offset)
        self.in_flight.append((key, tuple(futures)))
        self.in_flight_offsets.add(key)

    def settle(self, now: float) -> int:
        """Move records whose outputs were all delivered to done; returns how many failed
        (their offsets stay undone, so the commit stops before them)."""
        waiting, failed, done = [], 0, {}  # done: tp -> offsets (one mark_done per partition)
        for entry in self.in_flight:
            key, futures = entry
            if not all(map(_done, futures)):
                waiting.append(entry)
                continue
            self.in_flight_offsets.discard(key)
            if any(map(_failed, futures)):
                failed += 1
                log.warning("outputs of %s offset %d not delivered: it will be processed again",
                            *key)
            else:
                done.setdefault(key[0], []).append(key[1])
        for tp, offsets in done.items():
            self.mark_done(tp, offsets, now)
        self.in_flight = waiting
        return failed

    def mark_done(self, tp: Hashable, offsets: Iterable[int], now: float) -> None:
        part = self.parts.setdefault(tp, PartitionLedger())
        # Offsets below the frontier are done already (a late duplicate): keeping them would
        # only grow `done`, which must hold offsets at or above the frontier.
        part.done.update(o for o in offsets if part.frontier is None or o >= part.frontier)
        part.advance(now)

    def no_record(self, tp: Hashable, start: int, end: int, now: float) -> None:
        """Offsets [start, end) hold no record to process (markers, aborted records, as the
        fetch found them): done, without counting a long run offset by offset when the
        frontier is already inside it."""
        part = self.parts.setdefault(tp, PartitionLedger())
        if part.frontier is not None and start <= part.frontier < end:
            part.frontier = end
            part.done = {o for o in part.done if o >= end}
            part.advance(now)
        else:
            self.mark_done(tp, range(start, end), now)

    def due(self, tps: Iterable[Hashable]) -> dict[Hashable, int]:
        """Offsets to commit now among `tps` (the current assignment)."""
        out = {}
        for tp in tps:
            part = self.parts.get(tp)
            if part and part.frontier is not None and part.frontier != part.committed:
                out[tp] = part.frontier
        return out

    def frontier_with(self, tp: Hashable, offsets: Iterable[int]) -> int | None:
        """The frontier `tp` would have once `offsets` are done too (None: not assigned)."""
        part = self.parts.get(tp)
        if part is None or part.frontier is None:
            return None
        done, frontier = part.done.union(offsets), part.frontier
        while frontier in done:
            frontier += 1
        return frontier

    def committed(self, offsets: dict[Hashable, int]) -> None:
        for tp, offset in offsets.items():
            self.parts[tp].committed = offset

    def holes(self, now: float, older_than_s: float) -> dict[Hashable, tuple[int, int]]:
        """Partitions whose frontier has waited on a missing offset for `older_than_s`:
        tp -> (frontier, highest done offset)."""
        return {tp: (p.frontier, max(p.done)) for tp, p in self.parts.items()
                if p.hole_since is not None and p.frontier is not None
                and now - p.hole_since >= older_than_s}

    def defer_hole(self, tp: Hashable, now: float) -> None:
        """The missing record was asked for again: look again only after another wait."""
        part = self.parts.get(tp)
        if part is not None and part.hole_since is not None:
            part.hole_since = now

    def revoke(self, tps: Iterable[Hashable]) -> None:
        """Forget the frontier of partitions no longer ours (kept: what is done)."""
        for tp in tps:
            part = self.parts.get(tp)
            if part is not None:
                part.frontier = part.committed = None
                part.hole_since = None
