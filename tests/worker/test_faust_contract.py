"""The faust-streaming internals the worker relies on (docs/architecture.md, "What replaces
Faust's bookkeeping"). Each test names the behaviour replaced; one failing after an upgrade
means: re-read that section, check whether the new Faust still needs the workaround, adapt."""
import importlib.metadata
import inspect

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

PINNED = "0.15.3"  # pyproject.toml pins this; the checks below were made against it


def test_the_pinned_faust_is_installed():
    version = importlib.metadata.version("faust-streaming")
    assert version == PINNED, (
        f"faust-streaming {version} is installed, the worker's workarounds were checked against "
        f"{PINNED}: re-check docs/architecture.md's list, then update PINNED and pyproject.toml")


def test_read_offset_filter_is_a_mapping_read_through_getitem():
    # Committer.install swaps Consumer._read_offset for BlindReadOffsets: Faust drops every
    # record below the last offset read, redeliveries included; the swap works only while the
    # fetch loop reads the mapping through __getitem__ and treats None as "deliver".
    assert "self._read_offset = " in inspect.getsource(Consumer.__init__)
    fetch_loop = inspect.getsource(Consumer)
    assert "get_read_offset = self._read_offset.__getitem__" in fetch_loop
    assert "if r_offset is None or offset >= r_offset:" in fetch_loop


def test_commit_takes_explicit_offsets():
    # Committer commits its own frontier through Consumer._commit(offsets) -> bool.
    params = list(inspect.signature(Consumer._commit).parameters)
    assert params[:2] == ["self", "offsets"], params


def test_the_driver_thread_exposes_its_aiokafka_consumer():
    # The hole check reads the log through the aiokafka consumer the driver thread owns.
    assert callable(AIOKafkaConsumerThread._ensure_consumer)


def test_exactly_once_reads_read_committed_once_inside_a_worker():
    # Exactly-once relies on Faust's exactly_once consumer for read_committed (input and table
    # recovery). Faust decides it once, when the consumer is made, from App.in_transaction,
    # which is True only inside a worker: hence the consumer is made at start
    # (InterestStreamApp.before_start), never at import.
    from faust.app.base import App

    in_transaction = App.__dict__["in_transaction"]._cached_property__get  # mode's cached_property
    assert "self.in_worker" in inspect.getsource(in_transaction)
    assert "self.in_transaction = self.app.in_transaction" in inspect.getsource(Consumer.__init__)
    make = inspect.getsource(AIOKafkaConsumerThread._create_worker_consumer)
    assert 'isolation_level = "read_committed"' in make and "in_transaction" in make


def test_fausts_own_transactional_producers_start_in_one_replaceable_call():
    # TransactionalCommitter.install replaces the TransactionManager's on_rebalance (which
    # starts Faust's per-partition producers, unused here) on the consumer's instance.
    from faust.app.base import App
    from faust.transport.consumer import TransactionManager

    assigned = inspect.getsource(App._on_partitions_assigned)
    assert "consumer.transactions.on_rebalance" in assigned
    assert list(inspect.signature(TransactionManager.on_rebalance).parameters) == [
        "self", "assigned", "revoked", "newly_assigned"]


def test_the_worker_app_makes_no_consumer_at_import():
    from faust.app.base import App

    from streams.worker import pipeline  # noqa: F401  (builds the app, its agent and table)
    from streams.worker.app import app

    assert "self._consumer = self._new_consumer()" in inspect.getsource(App.consumer.fget)
    assert app._consumer is None  # made on first use


def test_recovery_exposes_what_the_recovery_watch_reads():
    # RecoveryWatch and /healthz read these attributes of app.tables.recovery.
    source = inspect.getsource(Recovery)
    for name in ("in_recovery", "active_offsets", "active_highwaters", "active_tps", "completed"):
        assert f"self.{name}" in source, name
