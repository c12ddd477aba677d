"""Restarts the reading of a changelog partition whose records were fetched but never reached
Faust's table recovery.

Seen in about 1 fault-suite run in 9 (issue #7): a worker joined while a killed member was still
in the group, got half the partitions, and got the rest when that member's session expired. In
that second recovery the consumer's position for the newly assigned changelog partitions went
to the end of the log (e.g. 48 of 48) while recovery had received none of their records (its
offset stayed -1): somewhere between the fetch and Faust's changelog queue they were dropped, and
as the position had moved past them nothing fetched them again. Recovery waited for them
forever ("No event received for active tp ... since recovery start"), so the worker consumed
nothing more. This watch sees exactly that state, the consumer past what recovery applied with
no progress for RECOVERY_STALL_S, and seeks the partition back to the first unapplied offset.
Replaying a changelog is idempotent (each record sets a key's value, in log order; Faust skips
offsets it has applied), so a false alarm costs a re-read, never wrong state.
"""
from __future__ import annotations

from typing import Hashable, Mapping


class RecoveryWatch:
    """Per changelog partition: the recovery offset last seen and since when it has not moved."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.progress: dict[Hashable, tuple[int, float]] = {}  # tp -> (offset, since)

    def reset(self) -> None:
        """Recovery is over (or restarted): forget what was seen."""
        self.progress.clear()

    def stalled(self, applied: Mapping[Hashable, int], highwaters: Mapping[Hashable, int | None],
                positions: Mapping[Hashable, int | None], now: float) -> dict[Hashable, int]:
        """tp -> offset to read again from, for partitions where recovery still needs records,
        the consumer has fetched past the last applied one, and the applied offset has not moved
        for `stall_after_s`. `applied` is Faust's last applied offset (-1: none)."""
        out = {}
        for tp, offset in applied.items():
            seen = self.progress.get(tp)
            if seen is None or seen[0] != offset:
                self.progress[tp] = (offset, now)
                continue
            highwater, position = highwaters.get(tp), positions.get(tp)
            if highwater is None or position is None or offset >= highwater:
                continue  # nothing left to read, or the consumer has no position yet
            if position > offset + 1 and now - seen[1] >= self.stall_after_s:
                out[tp] = offset + 1
                self.progress[tp] = (offset, now)  # give the re-read its own time
        return out
