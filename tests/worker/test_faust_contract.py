"""The faust-streaming internals the worker relies on (docs/architecture.md, "What replaces
Faust's bookkeeping"). Each test names the behaviour replaced; one failing after an upgrade
means: re-read that section, check whether the new Faust still needs the workaround, adapt."""
import contextvars
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


def test_the_current_event_is_a_context_variable():
    # Outputs and changelog records in exactly-once mode go through Faust's transaction of the
    # event's source partition, found through faust.streams._current_event.
    import faust.streams

    assert isinstance(faust.streams._current_event, contextvars.ContextVar)


def test_recovery_exposes_what_the_recovery_watch_reads():
    # RecoveryWatch and /healthz read these attributes of app.tables.recovery.
    source = inspect.getsource(Recovery)
    for name in ("in_recovery", "active_offsets", "active_highwaters", "active_tps", "completed"):
        assert f"self.{name}" in source, name
