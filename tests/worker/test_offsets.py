"""OffsetLedger: what may be committed after out-of-order, repeated and failed deliveries."""
import asyncio

import pytest

from streams.worker.offsets import OffsetLedger

TP = ("events", 1)


class Delivery:
    """A stand-in for a producer future: pending, delivered or failed."""

    def __init__(self, error: Exception | None = None, done: bool = True):
        self.error, self._done = error, done

    def done(self):
        return self._done

    def cancelled(self):
        return False

    def exception(self):
        return self.error


def processed(ledger, offsets, tp=TP, now=0.0):
    for o in offsets:
        ledger.sent(tp, o, [Delivery()])
    ledger.settle(now)


def test_commits_the_unbroken_run_from_the_committed_offset():
    ledger = OffsetLedger()
    ledger.assign(TP, 47, now=0.0)
    processed(ledger, range(47, 82))
    assert ledger.due([TP]) == {TP: 82}
    ledger.committed({TP: 82})
    assert ledger.due([TP]) == {}


def test_a_jump_is_not_committed_past_and_the_redelivery_fills_it():
    # Faust's case: 47..81 delivered, then 106.. from an older fetch, then 47.. again.
    ledger = OffsetLedger()
    ledger.assign(TP, 47, now=0.0)
    processed(ledger, range(47, 82))
    processed(ledger, range(106, 182))
    assert ledger.due([TP]) == {TP: 82}  # never past 82..105
    assert ledger.seen(TP, 60) and ledger.seen(TP, 150)  # redeliveries are skipped
    assert not ledger.seen(TP, 82)
    processed(ledger, range(82, 106))
    assert ledger.due([TP]) == {TP: 182}


def test_an_offset_is_done_only_when_its_outputs_are_delivered():
    ledger = OffsetLedger()
    ledger.assign(TP, 0, now=0.0)
    pending = Delivery(done=False)
    ledger.sent(TP, 0, [Delivery(), pending])
    ledger.settle(0.0)
    assert ledger.due([TP]) == {}
    assert ledger.seen(TP, 0)  # in flight: a redelivery now would only duplicate it
    pending._done = True
    ledger.settle(0.0)
    assert ledger.due([TP]) == {TP: 1}


def test_a_failed_delivery_keeps_the_offset_undone():
    ledger = OffsetLedger()
    ledger.assign(TP, 0, now=0.0)
    ledger.sent(TP, 0, [Delivery(error=RuntimeError("broker gone"))])
    ledger.sent(TP, 1, [Delivery()])
    assert ledger.settle(5.0) == 1
    assert ledger.due([TP]) == {}
    assert not ledger.seen(TP, 0)  # processed again when redelivered
    assert ledger.holes(now=20.0, older_than_s=10.0) == {TP: (0, 1)}
    assert ledger.holes(now=10.0, older_than_s=10.0) == {}
    ledger.defer_hole(TP, now=20.0)  # asked for again at 20 s
    assert ledger.holes(now=25.0, older_than_s=10.0) == {}
    assert ledger.holes(now=30.0, older_than_s=10.0) == {TP: (0, 1)}


def test_offsets_shown_absent_from_the_log_count_as_done():
    ledger = OffsetLedger()
    ledger.assign(TP, 10, now=0.0)
    processed(ledger, [10, 12, 13])  # 11: a transaction marker
    ledger.mark_done(TP, [11], now=1.0)
    assert ledger.due([TP]) == {TP: 14}
    assert ledger.holes(now=100.0, older_than_s=1.0) == {}


def test_work_done_before_assignment_counts_and_commits_stay_in_the_assignment():
    ledger = OffsetLedger()
    processed(ledger, [5, 6])  # a batch finished while the rebalance was running
    assert ledger.due([TP]) == {}  # not ours yet: nothing to commit
    ledger.assign(TP, 5, now=0.0)
    assert ledger.due([TP]) == {TP: 7}
    assert ledger.due([("events", 2)]) == {}
    ledger.revoke([TP])
    assert ledger.due([TP]) == {}


def test_reassignment_starts_from_the_group_offset_when_another_worker_went_further():
    ledger = OffsetLedger()
    ledger.assign(TP, 0, now=0.0)
    processed(ledger, range(0, 10))
    ledger.revoke([TP])
    ledger.assign(TP, 50, now=0.0)
    assert ledger.due([TP]) == {}  # 50 is already committed
    processed(ledger, [50])
    assert ledger.due([TP]) == {TP: 51}


def test_a_late_duplicate_below_the_frontier_opens_no_hole():
    ledger = OffsetLedger()
    ledger.assign(TP, 0, now=0.0)
    processed(ledger, range(0, 5))
    processed(ledger, [2], now=1.0)  # processed again after a re-seek, delivered late
    assert ledger.parts[TP].done == set()
    assert ledger.holes(now=100.0, older_than_s=10.0) == {}
    assert ledger.due([TP]) == {TP: 5}


def test_reassignment_forgets_done_offsets_below_the_new_start():
    ledger = OffsetLedger()
    processed(ledger, [3, 12])  # done while unassigned
    ledger.assign(TP, 10, now=0.0)
    assert ledger.parts[TP].done == {12}  # 3 is below the group's offset: forgotten
    assert ledger.holes(now=20.0, older_than_s=10.0) == {TP: (10, 12)}


def test_with_real_futures():
    async def run():
        loop = asyncio.get_running_loop()
        ok, bad = loop.create_future(), loop.create_future()
        ledger = OffsetLedger()
        ledger.assign(TP, 0, now=0.0)
        ledger.sent(TP, 0, [ok])
        ledger.sent(TP, 1, [bad])
        ok.set_result(None)
        bad.set_exception(OSError("timeout"))
        return ledger.settle(0.0), ledger.due([TP])

    assert asyncio.run(run()) == (1, {TP: 1})


@pytest.mark.parametrize("order", [[3, 1, 2, 0], [0, 2, 1, 3], [2, 3, 0, 1]])
def test_any_order_of_completion_gives_the_same_commit(order):
    ledger = OffsetLedger()
    ledger.assign(TP, 0, now=0.0)
    processed(ledger, order)
    assert ledger.due([TP]) == {TP: 4}


def test_frontier_with_counts_offsets_as_done_without_marking_them():
    ledger = OffsetLedger()
    assert ledger.frontier_with(TP, [0, 1]) is None  # not assigned yet: nothing to commit
    ledger.assign(TP, 10, 0.0)
    assert ledger.frontier_with(TP, [10, 11, 13]) == 12  # 12 missing: the frontier waits
    assert ledger.frontier_with(TP, []) == 10
    assert not ledger.seen(TP, 10)  # only asked, not marked
