"""TransactionalBatches: one transaction per input partition, over one batch or every batch of
TRANSACTION_COMMIT_MS; what a failure puts back and what is tried again. Producers and the
committer are fakes; the real broker's side is tests/integration/test_faults.py and
test_recovery.py (exactly_once)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaError, ProducerFenced

from streams import metrics
from streams.config import Settings
from streams.worker import transactions
from streams.worker.state_table import StateTable
from streams.worker.transactions import TransactionalBatches, TransactionalCommitter


class FakeProducer:
    def __init__(self, partition: int, log: list, failures: list):
        self.partition, self.log, self.failures = partition, log, failures

    async def begin_transaction(self):
        self.log.append(("begin", self.partition))

    async def send(self, topic, value, key=None, partition=None, headers=None):
        self.log.append(("send", self.partition, topic, value))
        return asyncio.get_running_loop().create_future()

    async def send_offsets_to_transaction(self, offsets, group_id):
        self.log.append(("offsets", self.partition, offsets, group_id))

    async def commit_transaction(self):
        if self.failures:
            raise self.failures.pop(0)
        self.log.append(("commit", self.partition))

    async def abort_transaction(self):
        self.log.append(("abort", self.partition))


class FakeCommitter:
    def __init__(self, failures: dict[int, list], owned=(0, 1)):
        self.log: list = []
        producers = {p: FakeProducer(p, self.log, failures.setdefault(p, [])) for p in (0, 1)}
        self.producers = SimpleNamespace(get=producers.__getitem__, find=producers.get)
        self.settings = SimpleNamespace(app_id="app")
        self.owned, self.to_renew, self.committed = set(owned), set(), []
        self.before_revoke = None
        self.behind = 10**6  # records in the log beyond a batch: a backlog unless set lower

    async def claim(self, partitions):
        return partitions & self.owned

    def fresh(self, events):
        return list(events)

    def offsets(self, partition, events):
        return {("events", partition): max(fe.message.offset for fe in events) + 1}

    def done(self, events, offsets):
        self.committed.append(offsets)

    def lag(self, events):
        return self.behind


def record(partition: int, offset: int):
    return SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset,
                                                   tp=("events", partition)))


def setup(failures=None, owned=(0, 1), processed=True, interval_s=0.0):
    """The log holds a backlog behind every batch (FakeCommitter.behind): the interval
    decides when a transaction commits."""
    committer = FakeCommitter(failures or {}, owned)
    batches = TransactionalBatches(committer, interval_s, backlog=256)
    table = SimpleNamespace(data={"u0": 100, "u1": 100},
                            changelog_topic=SimpleNamespace(get_topic_name=lambda: "changelog"))
    batches.state_table = states = StateTable(table, send=batches.send_changelog)
    seen = []

    async def process(events):
        for fe in events:
            p = fe.message.partition
            seen.append((p, fe.message.offset))
            await states.put(fe, f"u{p}", states.get(f"u{p}") + 1)
            await batches.send(p, "recommendations", None, b"out-%d" % fe.message.offset)
        return processed

    batches.bind(process)
    return committer, batches, table, process, seen


BATCH = [record(0, 5), record(1, 7), record(0, 6)]


def test_each_partition_commits_its_outputs_state_and_offsets_together():
    committer, batches, table, process, _ = setup()
    asyncio.run(batches.run(BATCH))
    for p, next_offset in ((0, 7), (1, 8)):
        entries = [e for e in committer.log if e[1] == p]
        assert entries[0] == ("begin", p) and entries[-1] == ("commit", p)
        assert ("offsets", p, {("events", p): next_offset}, "app") in entries
        sends = [e[2] for e in entries if e[0] == "send"]
        assert "recommendations" in sends and "changelog" in sends  # in that partition's
    assert table.data == {"u0": 102, "u1": 101}
    assert not batches.busy


def test_a_failed_commit_puts_that_partitions_state_back_and_tries_it_again_alone():
    committer, batches, table, process, seen = setup({1: [KafkaError("broker went away")]})
    asyncio.run(batches.run(BATCH))
    assert ("abort", 1) in committer.log and ("abort", 0) not in committer.log
    assert seen == [(0, 5), (1, 7), (0, 6), (1, 7)]  # only partition 1 again
    assert table.data == {"u0": 102, "u1": 101}  # counted once: 100 put back, then +1
    assert [e for e in committer.log if e[0] == "commit"] == [("commit", 0), ("commit", 1)]
    assert len(committer.committed) == 2


def test_a_fenced_partition_is_left_to_its_new_owner():
    committer, batches, table, process, seen = setup({1: [ProducerFenced()]})
    asyncio.run(batches.run(BATCH[:2]))
    assert 1 in committer.to_renew  # a new producer before this worker uses it again
    assert seen == [(0, 5), (1, 7)]  # not processed again here: renewing would fence the owner
    assert table.data == {"u0": 101, "u1": 100}  # partition 1's change put back
    assert ("abort", 1) not in committer.log  # a fenced producer cannot abort


def test_a_stop_before_the_batch_is_processed_commits_nothing():
    committer, batches, table, process, _ = setup(processed=False)
    asyncio.run(batches.run(BATCH))
    assert not [e for e in committer.log if e[0] in ("commit", "offsets")]
    assert ("abort", 0) in committer.log and ("abort", 1) in committer.log
    assert table.data == {"u0": 100, "u1": 100}


def test_a_send_that_fails_aborts_the_batch_and_tries_it_again():
    committer, batches, table, _, seen = setup()
    failures = [KafkaError("request timed out")]

    async def process(events):
        for fe in events:
            seen.append(fe.message.offset)
            await batches.state_table.put(fe, "u0", batches.state_table.get("u0") + 1)
            if failures:
                raise failures.pop()
        return True

    batches.bind(process)
    asyncio.run(batches.run([record(0, 5)]))
    assert seen == [5, 5]
    assert table.data["u0"] == 101
    assert committer.log.count(("abort", 0)) == 1 and committer.log.count(("commit", 0)) == 1


def test_a_batch_that_keeps_failing_stops_the_worker():
    committer, batches, _, process, _ = setup(
        {0: [KafkaError("no")] * transactions.MAX_ATTEMPTS})
    with pytest.raises(KafkaError, match="transactions in a row failed"):
        asyncio.run(batches.run([record(0, 5)]))
    assert not batches.busy


def test_a_batch_that_raises_is_tried_again_record_by_record_in_a_new_transaction():
    """No record of the failed try reaches a committed transaction twice."""
    committer, batches, table, process, seen = setup()
    tries = []

    async def failing(events):
        await process(events[:1])  # sends the first record's output, then fails
        raise ValueError("a bug")

    async def isolated(events, exc):
        tries.append(type(exc).__name__)
        return await process(events)

    batches.bind(failing, isolated)
    asyncio.run(batches.run(BATCH))
    assert tries == ["ValueError"]
    assert ("abort", 0) in committer.log and ("abort", 1) in committer.log
    assert seen == [(0, 5), (0, 5), (1, 7), (0, 6)]
    assert table.data == {"u0": 102, "u1": 101}  # the failed try's change put back
    assert [e for e in committer.log if e[0] == "commit"] == [("commit", 0), ("commit", 1)]


def test_a_revoke_waits_for_open_transactions_not_for_a_batch_still_claiming():
    """The revoke runs inside the rebalance; a batch claiming its partitions may be waiting
    on the consumer thread, which waits for the revoke: it must not be waited for."""
    committer, batches, _, process, _ = setup()
    claiming, release = asyncio.Event(), None

    async def run():
        nonlocal release
        release = asyncio.Event()
        original = committer.claim

        async def slow_claim(partitions):
            claiming.set()
            await release.wait()  # the consumer thread is busy with the rebalance
            return await original(partitions)

        committer.claim = slow_claim
        task = asyncio.ensure_future(batches.run(BATCH))
        await claiming.wait()
        await asyncio.wait_for(committer.before_revoke(5.0), 0.5)  # returns at once
        assert batches.busy and not batches.open
        release.set()
        await task

    asyncio.run(run())
    assert not batches.open


def commits(committer):
    return [e for e in committer.log if e[0] == "commit"]


def observed(histogram) -> tuple[float, float]:
    """A prometheus histogram's count and sum so far."""
    samples = {s.name.rsplit("_", 1)[-1]: s.value for s in histogram.collect()[0].samples}
    return samples["count"], samples["sum"]


def test_batches_within_the_commit_interval_share_one_transaction_per_partition():
    committer, batches, table, _, _ = setup(interval_s=60.0)
    held_before, commits_before = observed(metrics.TRANSACTION_BATCHES), \
        observed(metrics.TRANSACTION_COMMIT_SECONDS)[0]

    async def run():
        await batches.run(BATCH)
        await batches.run([record(0, 8), record(1, 9)])
        assert not commits(committer)  # not due: the transactions stay open
        await committer.before_revoke(1.0)  # a revoke commits them at once

    asyncio.run(run())
    # one commit, of two batches, timed
    count, total = observed(metrics.TRANSACTION_BATCHES)
    assert (count - held_before[0], total - held_before[1]) == (1, 2)
    assert observed(metrics.TRANSACTION_COMMIT_SECONDS)[0] == commits_before + 1
    assert [e for e in committer.log if e[0] == "begin"] == [("begin", 0), ("begin", 1)]
    assert commits(committer) == [("commit", 0), ("commit", 1)]
    # each batch adds its partition's offsets; the last added is the one committed
    assert [e[2] for e in committer.log if e[0] == "offsets" and e[1] == 0] == [
        {("events", 0): 7}, {("events", 0): 9}]
    assert committer.committed == [{("events", 0): 9}, {("events", 1): 10}]
    assert table.data == {"u0": 103, "u1": 102}
    assert not batches.open


def test_a_failed_commit_processes_every_batch_its_transaction_held_again():
    committer, batches, table, _, seen = setup({0: [KafkaError("broker went away")]},
                                               interval_s=60.0)

    async def run():
        await batches.run(BATCH)
        await batches.run([record(0, 8)])
        await batches.commit_open(1.0)

    asyncio.run(run())
    assert seen == [(0, 5), (1, 7), (0, 6), (0, 8), (0, 5), (0, 6), (0, 8)]
    assert table.data == {"u0": 103, "u1": 101}  # partition 0 put back, then counted once
    assert commits(committer) == [("commit", 1), ("commit", 0)]


def test_a_failed_send_in_a_later_batch_processes_the_earlier_ones_again_too():
    committer, batches, table, process, seen = setup(interval_s=60.0)
    failures = [KafkaError("request timed out")]

    async def failing_at_8(events):
        if any(fe.message.offset == 8 for fe in events) and failures:
            await process(events)
            raise failures.pop()
        return await process(events)

    batches.bind(failing_at_8)

    async def run():
        await batches.run(BATCH)
        await batches.run([record(0, 8)])
        await batches.commit_open(1.0)

    asyncio.run(run())
    assert seen == [(0, 5), (1, 7), (0, 6), (0, 8), (0, 5), (0, 6), (1, 7), (0, 8)]
    assert table.data == {"u0": 103, "u1": 101}
    assert ("abort", 0) in committer.log and ("abort", 1) in committer.log
    assert commits(committer) == [("commit", 0), ("commit", 1)]


def test_a_batch_in_flight_that_fails_when_the_commit_waits_for_it_is_processed_again():
    committer, batches, table, process, seen = setup(interval_s=60.0)
    failures = [KafkaError("a send of the batch in flight failed")]

    async def flush():
        if failures:
            raise failures.pop()

    batches.bind(process, flush=flush)

    async def run():
        await batches.run(BATCH)
        await batches.commit_open(1.0)

    asyncio.run(run())
    assert seen == [(0, 5), (1, 7), (0, 6), (0, 5), (0, 6), (1, 7)]
    assert table.data == {"u0": 102, "u1": 101}
    assert commits(committer) == [("commit", 0), ("commit", 1)]


def test_a_transaction_that_comes_due_with_no_batch_to_carry_it_commits_by_itself():
    committer, batches, table, _, _ = setup(interval_s=0.05)

    async def run():
        await batches.run(BATCH)
        assert not commits(committer)
        await asyncio.sleep(0.3)
        assert commits(committer) == [("commit", 0), ("commit", 1)]
        await batches.stop()

    batches.producers.stop_all = lambda: asyncio.sleep(0)
    asyncio.run(run())
    assert committer.committed == [{("events", 0): 7}, {("events", 1): 8}]
    assert not batches.open


def test_a_batch_with_less_than_a_batch_behind_it_commits_at_once_within_the_interval():
    """The worker has caught up with its input: holding the transaction would only add
    latency."""
    committer, batches, _, _, _ = setup(interval_s=60.0)

    async def run():
        await batches.run(BATCH)  # a backlog behind it: held
        assert not commits(committer)
        committer.behind = 255
        await batches.run([record(0, 8)])  # caught up: everything open commits
        assert commits(committer) == [("commit", 0), ("commit", 1)]

    asyncio.run(run())
    assert committer.committed == [{("events", 0): 9}, {("events", 1): 8}]


def test_the_lag_behind_a_batch_is_read_from_the_consumers_high_waters():
    highwaters = {("events", 0): 300, ("events", 1): 9}

    def highwater(tp):
        if tp not in highwaters:
            raise KeyError(tp)  # revoked meanwhile
        return highwaters[tp]

    app = SimpleNamespace(consumer=SimpleNamespace(highwater=highwater))
    committer = TransactionalCommitter(app, Settings(), producers=None)
    assert committer.lag([record(0, 5), record(1, 7), record(0, 6)]) == 300 - 7
    assert committer.lag([record(1, 8)]) == 0  # the newest record of its partition
    assert committer.lag([record(2, 1)]) == 0


def test_after_a_due_commit_that_failed_for_good_no_batch_is_taken():
    """Its records' offsets stay behind: a later batch's outputs committed now would be
    published again when a new owner processes from those offsets."""
    committer, batches, _, _, seen = setup({0: [KafkaError("no")] * transactions.MAX_ATTEMPTS},
                                           interval_s=0.01)
    faults = []
    batches.on_fault = faults.append

    async def run():
        await batches.run([record(0, 5)])  # a backlog behind it: the due commit's task
        await batches._closer
        with pytest.raises(KafkaError, match="transactions in a row failed"):
            await batches.run([record(0, 6)])

    asyncio.run(run())
    assert len(faults) == 1 and (0, 6) not in seen and not commits(committer)


def test_a_timers_records_commit_in_a_transaction_of_their_own_without_offsets():
    """The roll marker of a quiet partition: only partitions this worker owns."""
    committer, batches, table, _, _ = setup(owned=(1,))
    asyncio.run(batches.write_apart({0, 1}, batches.state_table.roll_marker))
    assert committer.log == [("begin", 1), ("send", 1, "changelog", None), ("commit", 1)]
    assert not committer.committed and not batches.open


def test_a_timers_records_join_the_open_transaction_of_their_partition():
    committer, batches, _, _, _ = setup(interval_s=60.0)  # a backlog: the transaction stays open

    async def run():
        await batches.run([record(0, 5)])
        await batches.write_apart({0, 1}, batches.state_table.roll_marker)
        assert committer.log[-4:] == [("send", 0, "changelog", None),  # into the open one
                                      ("begin", 1), ("send", 1, "changelog", None),
                                      ("commit", 1)]
        await batches.commit_open(1.0)
        batches._closer.cancel()

    asyncio.run(run())
    zero = [e for e in committer.log if e[1] == 0]
    assert zero[0] == ("begin", 0) and zero[-1] == ("commit", 0)
    assert zero.count(("begin", 0)) == 1 and ("send", 0, "changelog", None) in zero
    assert [e for e in committer.log if e[1] == 1] == [
        ("begin", 1), ("send", 1, "changelog", None), ("commit", 1)]
    assert committer.committed == [{("events", 0): 6}]


@pytest.mark.parametrize("error", [KafkaError("broker went away"), ProducerFenced()])
def test_a_timers_transaction_that_fails_is_aborted_or_left_to_the_new_owner(error):
    committer, batches, _, _, _ = setup({1: [error]})
    asyncio.run(batches.write_apart({0, 1}, batches.state_table.roll_marker))
    assert ("commit", 0) in committer.log and ("commit", 1) not in committer.log
    if isinstance(error, ProducerFenced):
        assert committer.to_renew == {1} and ("abort", 1) not in committer.log
    else:
        assert ("abort", 1) in committer.log and not committer.to_renew


def test_claims_at_once_from_the_agent_and_a_timer_renew_a_partition_once():
    """A second renewal would fence the producer the first one made for the batch."""
    renewed = []

    class Producers:
        producers: dict = {}

        async def renew(self, partition):
            renewed.append(partition)
            await asyncio.sleep(0.01)  # init_transactions: a round trip to the coordinator
            self.producers[partition] = object()

    from faust.types import TP

    tps = [TP(t, p) for t in ("events", "control") for p in (0, 1)]
    app = SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: tps))
    committer = TransactionalCommitter(app, Settings(topic_events="events",
                                                     topic_control="control"), Producers())

    async def run():
        return await asyncio.gather(committer.claim({1}), committer.claim({1}))

    assert asyncio.run(run()) == [{1}, {1}]
    assert renewed == [1]
