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

import asyncio
import logging
import time
from typing import Hashable, Mapping

from streams import metrics

log = logging.getLogger(__name__)


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

    async def check(self, recovery, consumer) -> None:
        """One look at Faust's table recovery (`app.tables.recovery`); seeks stalled
        partitions back. Called every few seconds by the worker."""
        if not recovery.in_recovery:
            self.reset()
            return
        applied = {tp: recovery.active_offsets[tp] for tp in list(recovery.active_tps)}
        highwaters = dict(recovery.active_highwaters)
        positions = {}
        for tp, offset in applied.items():
            if highwaters.get(tp) is not None and offset < highwaters[tp]:
                try:
                    positions[tp] = await asyncio.wait_for(consumer.position(tp), 2.0)
                except Exception:  # revoked meanwhile, or no position yet: look next time
                    continue
        for tp, offset in self.stalled(applied, highwaters, positions, time.monotonic()).items():
            log.warning("recovery of %s stalled: consumer at %s, recovery applied up to %d of %d; "
                        "reading it again from %d", tp, positions[tp], applied[tp],
                        highwaters[tp], offset)
            metrics.RECOVERY_REREADS.inc()
            try:
                await consumer.seek_wait({tp: offset})
            except Exception as exc:  # a rebalance meanwhile restarts recovery anyway
                log.warning("re-reading %s failed: %r", tp, exc)
