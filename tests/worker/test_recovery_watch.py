"""RecoveryWatch: which changelog partitions to read again when Faust's recovery stalls."""
from streams.worker.recovery_watch import RecoveryWatch

TP1, TP3 = ("changelog", 1), ("changelog", 3)


def test_the_observed_stall_is_read_again_from_the_first_unapplied_offset():
    # issue #7: consumer at the end (48), recovery applied nothing (-1) of 0..47
    watch = RecoveryWatch(stall_after_s=15)
    applied, highwaters, positions = {TP1: -1, TP3: 10}, {TP1: 47, TP3: 27}, {TP1: 48, TP3: 28}
    assert watch.stalled(applied, highwaters, positions, now=0.0) == {}  # first sight
    assert watch.stalled(applied, highwaters, positions, now=10.0) == {}  # not long enough
    assert watch.stalled(applied, highwaters, positions, now=15.0) == {TP1: 0, TP3: 11}
    # the re-read gets its own time before the next alarm
    assert watch.stalled(applied, highwaters, positions, now=20.0) == {}
    assert watch.stalled(applied, highwaters, positions, now=30.0) == {TP1: 0, TP3: 11}


def test_progress_resets_the_clock():
    watch = RecoveryWatch(stall_after_s=15)
    highwaters, positions = {TP1: 47}, {TP1: 48}
    for t, applied in [(0, 5), (10, 6), (20, 7), (30, 8)]:
        assert watch.stalled({TP1: applied}, highwaters, positions, now=float(t)) == {}


def test_no_alarm_while_the_consumer_has_not_read_past_recovery():
    # a slow fetch (position right after the applied offset) is waited for, not re-read
    watch = RecoveryWatch(stall_after_s=15)
    for t in (0.0, 20.0, 40.0):
        assert watch.stalled({TP1: 9}, {TP1: 47}, {TP1: 10}, now=t) == {}


def test_no_alarm_for_caught_up_or_unknown_partitions():
    watch = RecoveryWatch(stall_after_s=15)
    applied = {TP1: 47, TP3: -1}
    for t in (0.0, 20.0, 40.0):
        assert watch.stalled(applied, {TP1: 47, TP3: None}, {TP1: 48, TP3: 5}, now=t) == {}
        assert watch.stalled({TP3: -1}, {TP3: 27}, {}, now=t) == {}  # no position yet


def test_reset_forgets_the_previous_recovery():
    watch = RecoveryWatch(stall_after_s=15)
    watch.stalled({TP1: -1}, {TP1: 47}, {TP1: 48}, now=0.0)
    watch.reset()
    assert watch.stalled({TP1: -1}, {TP1: 47}, {TP1: 48}, now=20.0) == {}  # first sight again


def test_check_seeks_a_stalled_partition_of_faust_recovery_back():
    import asyncio
    from types import SimpleNamespace

    seeks = []

    class Consumer:
        async def position(self, tp):
            return {TP1: 48, TP3: 28}[tp]

        async def seek_wait(self, offsets):
            seeks.append(offsets)

    recovery = SimpleNamespace(in_recovery=True, active_tps={TP1, TP3},
                               active_offsets={TP1: -1, TP3: 27},
                               active_highwaters={TP1: 47, TP3: 27})
    watch = RecoveryWatch(stall_after_s=0.0)
    asyncio.run(watch.check(recovery, Consumer()))  # first sight
    asyncio.run(watch.check(recovery, Consumer()))
    assert seeks == [{TP1: 0}]  # TP3 has all it needs
    recovery.in_recovery = False
    asyncio.run(watch.check(recovery, Consumer()))
    assert watch.progress == {}
