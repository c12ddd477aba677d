"""The faust.App, its topics and its table; `streams.worker.pipeline` registers the agent on
it (`faust -A streams.worker.pipeline worker` runs it with Faust's own command line).

Records on `events` are read as raw bytes and validated by `streams.events` (a malformed
record must reach the dead-letter topic with its original bytes, which a typed Faust
deserialiser would not let us do).
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import faust
import orjson
from faust.serializers import codecs

from streams.config import Settings
from streams.errors import ConfigError
from streams.kafka.clients import changelog_configs
from streams.local.endpoints import resolve_kafka
from streams.worker import lenient_records, skipped_offsets, stable_highwaters

log = logging.getLogger(__name__)


def _credentials(settings: Settings):
    if not settings.kafka_sasl_mechanism and settings.kafka_security_protocol == "PLAINTEXT":
        return None
    import ssl

    context = None
    if "SSL" in settings.kafka_security_protocol:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password,
                                     mechanism=settings.kafka_sasl_mechanism,
                                     ssl_context=context)
    return faust.SSLCredentials(context)


class OrjsonCodec(codecs.Codec):
    """The state table's values as JSON through orjson: what Faust's "json" codec reads and
    writes for plain dicts and lists (old changelogs restore unchanged), ~8x faster to write
    a full state (2 vs 19 us), and the worker writes one per user and batch."""

    def _dumps(self, value) -> bytes:
        return orjson.dumps(value)

    def _loads(self, data: bytes):
        return orjson.loads(data)


codecs.register("orjson", OrjsonCodec())


async def send_raw(app: faust.App, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None = None, headers=None):
    """Queue one record straight on the producer; returns its delivery future. Faust's
    `Topic.send` adds a per-record future, callbacks and sensor calls on top (~10% of the event
    loop under load); the worker and the passthrough baseline both skip them. `partition`
    None: the producer's partitioner (by key)."""
    return await app.producer.send(topic, key, value, partition=partition, timestamp=None,
                                   headers=headers)


def settle_heap() -> None:
    """Both agents (the worker's and the passthrough baseline's) call this once started.

    Freeze what start-up left alive (modules, Faust's services, the models): the cycle
    collector's full collections then scan only later objects. They paused the worker's event
    loop for ~60 ms every ~10 s at 1,000 events/s; frozen, ~3.5 ms. `gc.collect()` first so no
    garbage is frozen with the rest.

    Then collect the young generation every 20,000 net allocations instead of every 700 (the
    older ones every 20 of those): each event allocates dozens of containers, almost none in a
    cycle, so most collections found nothing. A young collection then scans ~20,000 objects
    (~1 ms). Worker loop CPU per event 113.7 -> 109.9 us (3 interleaved runs)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class InterestStreamApp(faust.App):
    """The App, whose broker may be unknown at import: `faust -A streams.worker.pipeline worker --help`
    (or any import) needs no broker; starting a worker without one fails with the reason."""

    unresolved_broker: ConfigError | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Called once the worker starts, before the app creates its consumer. The consumer
        # must not be made earlier (at import): it fixes Faust's `in_transaction`, which is
        # True only inside a worker, and with it exactly-once's read_committed isolation.
        self.before_start: list = []

    async def on_first_start(self) -> None:
        if self.unresolved_broker is not None:
            raise self.unresolved_broker
        for hook in self.before_start:
            hook()
        await super().on_first_start()


def create_app(settings: Settings) -> faust.App:
    lenient_records.install()  # a header key that is not UTF-8 must not stop the consumer
    skipped_offsets.install()  # offsets with no record (markers) are committed past at once
    stable_highwaters.install()  # exactly-once recovery must read every committed state
    try:
        bootstrap, unresolved = resolve_kafka(settings), None
    except ConfigError as exc:  # told when a worker starts, not at import
        bootstrap, unresolved = "localhost:9092", exc
    datadir = Path(settings.state_dir) / "faust" / f"{settings.app_id}-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = InterestStreamApp(
        settings.app_id,
        broker=f"kafka://{bootstrap}",
        broker_credentials=_credentials(settings),
        store="memory://",
        key_serializer="json",  # the table's changelog keys; our topics override with raw
        value_serializer="json",
        datadir=str(datadir),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        # Join the group in seconds, and notice a dead worker in seconds.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=0.5,
        broker_rebalance_timeout=30.0,
        broker_commit_interval=settings.commit_interval_s,
        broker_commit_every=10_000,
        processing_guarantee=settings.processing_guarantee,
        producer_acks=-1,
        producer_linger_ms=1,
        # A recommendation is ~1.3 kB: Kafka's default 16 kB batch holds 12 of them, and a full
        # batch makes the agent's send wait for the request in flight. 256 kB (under the
        # broker's default 1 MB message.max.bytes): worker loop CPU per event 125 -> 120 us.
        producer_max_batch_size=256 * 1024,
        stream_wait_empty=False,
        stream_buffer_maxsize=4096,
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        table_standby_replicas=0,
        logging_config=None,
    )
    app.unresolved_broker = unresolved
    app.task(_quiet_client_logs(settings))
    return app


def _quiet_client_logs(settings: Settings):
    async def quiet_client_logs():
        """Faust's worker sets the root level; aiokafka's per-message debug records cost ~10%
        of an agent's event loop. On every app, so the passthrough baseline runs as the
        worker does (otherwise the benchmark's ratio is flattered)."""
        level = max(logging.getLevelName(settings.log_level.upper()), logging.INFO)
        for name in ("aiokafka", "faust.transport", "faust.topics"):
            logging.getLogger(name).setLevel(level)

    return quiet_client_logs


settings = Settings.from_env()
app = create_app(settings)

# The agent reads events and control records (privacy erasures) as one stream, so a forget
# is applied between the user's earlier and later events; Faust assigns the same partition
# number of both topics (and of the changelog) to one worker, since their counts are equal.
# The worker commits these topics' offsets itself (at-least-once: `streams.worker.committer`;
# exactly-once: in each batch's transactions, `streams.worker.transactions`), so Faust's acks
# are off for them. Faust's exactly_once setting stays on in that mode for its read_committed
# consumer and its table recovery up to the last stable offset.
input_topics = app.topic(settings.topic_events, settings.topic_control, key_serializer="raw",
                         value_serializer="raw", partitions=settings.partitions, acks=False)
recommendations_topic = app.topic(settings.topic_recommendations, key_serializer="raw",
                                  value_serializer="raw")
dlq_topic = app.topic(settings.topic_dlq, key_serializer="raw", value_serializer="raw")
control_topic = app.topic(settings.topic_control, key_serializer="raw", value_serializer="raw")

# Per-user short-term state, restored from its changelog topic after a restart or rebalance.
short_term_table = app.Table(
    "short_term", default=None, partitions=settings.partitions, key_type=str,
    help="user_id -> last N items and last M event ids",
    extra_topic_configs=changelog_configs(settings),
)
# Faust takes a table's codec from its value_type's model only; set before the changelog topic
# and the store (both created lazily, on first use) read it.
short_term_table.value_serializer = "orjson"

