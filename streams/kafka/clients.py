"""confluent-kafka clients configured from Settings, and topic creation.

Used by the replay/record tools, the demo, the tests and the benchmarks (the worker itself
talks to Kafka through Faust/aiokafka).
"""
from __future__ import annotations

import logging
import time
import uuid

from streams.config import Settings
from streams.errors import ConfigError, InfraError

log = logging.getLogger(__name__)


class OncePerKind(logging.Filter):
    """librdkafka repeats a failing connection's error every few ms: keep one line per kind
    (its facility, e.g. FAIL) every `interval_s`."""

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = str(record.msg).split(" ", 1)[0]
        now = time.monotonic()
        if now - self.last.get(kind, -1e9) < self.interval_s:
            return False
        self.last[kind] = now
        return True


def rdkafka_logger(settings: Settings) -> logging.Logger:
    """librdkafka's log lines through Python logging: errors only (its warnings are expected
    start-up retries, e.g. "Coordinator load in progress" on a fresh broker), all of them at
    LOG_LEVEL=DEBUG; the clients' own calls report what fails."""
    logger = logging.getLogger("librdkafka")
    if not logger.filters:
        logger.addFilter(OncePerKind())
    logger.setLevel(logging.DEBUG if settings.log_level.upper() == "DEBUG" else logging.ERROR)
    return logger


def client_config(settings: Settings, bootstrap: str) -> dict:
    """Base librdkafka config, security settings included (secrets never logged)."""
    conf = {"bootstrap.servers": bootstrap, "logger": rdkafka_logger(settings),
            "security.protocol": settings.kafka_security_protocol.lower()}
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username or ""
        conf["sasl.password"] = settings.kafka_sasl_password or ""
    if settings.kafka_ssl_cafile:
        conf["ssl.ca.location"] = settings.kafka_ssl_cafile
    return conf


def producer(settings: Settings, bootstrap: str, **extra):
    from confluent_kafka import Producer

    # murmur2 is Java's (and aiokafka's) default partitioner: a user's events land in the
    # same partition whichever client wrote them, so the state table stays co-partitioned.
    conf = dict(client_config(settings, bootstrap), **{
        "partitioner": "murmur2_random", "linger.ms": 5, "enable.idempotence": True})
    conf.update(extra)
    return Producer(conf)


def consumer(settings: Settings, bootstrap: str, group: str, **extra):
    from confluent_kafka import Consumer

    conf = dict(client_config(settings, bootstrap), **{
        "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "session.timeout.ms": 6000})
    conf.update(extra)
    return Consumer(conf)


def changelog_topic(settings: Settings) -> str:
    """The short-term state table's changelog (Faust's name for table `short_term`)."""
    return f"{settings.app_id}-short_term-changelog"


def changelog_configs(settings: Settings) -> dict[str, str]:
    """Compaction that removes a forgotten user's earlier states within FORGET_WITHIN_S (W).

    A record in the active segment is never compacted, and the segment rolls on the first
    append once it is W/2 old. The worker appends to each partition it owns at least every
    W/2: a roll marker at each W/4 tick after which it wrote nothing there
    (`changelog_roll_interval_s`, `StateTable.roll_marker`). So a forget's segment is closed within W of its start, when
    its oldest record is W old and the cleaner must compact it (it looks every
    `log.cleaner.backoff.ms`): within W of the forget. A tombstone itself goes W after
    that."""
    window = int(settings.forget_within_s * 1000)
    return {"cleanup.policy": "compact", "segment.ms": str(max(1, window // 2)),
            "max.compaction.lag.ms": str(window), "min.compaction.lag.ms": "0",
            "delete.retention.ms": str(window)}


def changelog_roll_interval_s(settings: Settings) -> float:
    """How often the worker appends a roll marker to a quiet changelog partition: W/4, so
    that appends come at least every W/2, the `segment.ms` of `changelog_configs`."""
    return settings.forget_within_s / 4


def ensure_topics(settings: Settings, bootstrap: str, timeout: float = 30.0,
                  state: bool = False) -> None:
    """Create `events`, `events.control`, `recommendations` and `events.dlq` if missing (with
    `state`, the state changelog too, its compaction settings applied). `events`, the control
    topic and the changelog must have PARTITIONS partitions: Faust assigns a user's partition
    of all three to one worker only when their counts are equal."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client_config(settings, bootstrap))
    try:
        existing = admin.list_topics(timeout=min(timeout, 15.0)).topics
    except Exception as exc:
        raise InfraError(f"cannot reach Kafka at {bootstrap} ({exc}); check "
                         "KAFKA_BOOTSTRAP_SERVERS, or start the local one with "
                         "`python -m streams up`") from None
    n = settings.partitions
    copartitioned = [settings.topic_events, settings.topic_control]
    wanted = [(settings.topic_events, n, {}), (settings.topic_control, n, {}),
              (settings.topic_recommendations, n, {}), (settings.topic_dlq, 1, {})]
    if state:
        copartitioned.append(changelog_topic(settings))
        wanted.append((changelog_topic(settings), n, changelog_configs(settings)))
    for name in copartitioned:
        have = len(existing[name].partitions) if name in existing else n
        if have != n:
            raise ConfigError(f"topic {name} has {have} partitions but PARTITIONS={n}: "
                              f"set PARTITIONS={have} (a user's events, control records and "
                              "state must share a partition number)")
    new = [NewTopic(name, num_partitions=n, replication_factor=-1, config=config)
           for name, n, config in wanted if name not in existing]
    for name, future in admin.create_topics(new, operation_timeout=timeout).items() if new else ():
        try:
            future.result()
            log.info("created topic %s", name)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise InfraError(f"cannot create topic {name}: {exc}") from exc
    if state and changelog_topic(settings) in existing:
        _set_configs(admin, changelog_topic(settings), changelog_configs(settings), timeout)
    if new:
        _await_leaders(admin, [t.topic for t in new], timeout)


def _set_configs(admin, topic: str, configs: dict[str, str], timeout: float) -> None:
    """Set `configs` on an existing topic, leaving its other settings as they are."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    entries = [ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
               for name, value in configs.items()]
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource], request_timeout=timeout).values():
        try:
            future.result()
        except Exception as exc:
            raise InfraError(f"cannot set {', '.join(configs)} on topic {topic}: {exc}") from exc


def _await_leaders(admin, topics: list[str], timeout: float) -> None:
    """A new topic answers 'not leader' until its partitions have elected one: wait for that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=timeout).topics
        if all(t in metadata and metadata[t].partitions and not metadata[t].error and
               all(p.leader >= 0 and not p.error for p in metadata[t].partitions.values())
               for t in topics):
            return
        time.sleep(0.1)
    raise InfraError(f"topics {topics} have no partition leaders after {timeout:.0f}s")


def tail_consumer(settings: Settings, bootstrap: str, topics: str | list[str],
                  timeout: float = 30.0):
    """A consumer positioned at the current end of every partition of `topics` (existing).

    Unlike auto.offset.reset=latest, whose position is looked up lazily after the group join,
    this fixes the start before anything else is produced: no record written afterwards is missed.
    """
    from confluent_kafka import TopicPartition

    cons = consumer(settings, bootstrap, f"tail-{uuid.uuid4().hex[:8]}")
    assignment = []
    for topic in [topics] if isinstance(topics, str) else topics:
        for p in cons.list_topics(topic, timeout=timeout).topics[topic].partitions:
            _, high = _with_retry(
                lambda: cons.get_watermark_offsets(TopicPartition(topic, p), timeout=5), timeout)
            assignment.append(TopicPartition(topic, p, high))
    cons.assign(assignment)
    return cons


def _with_retry(call, timeout: float):
    """Retry a client call through transient broker errors (leader elections) until `timeout`."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def produce(prod, topic: str, key: bytes | None, value: bytes, wait_s: float = 0.05) -> None:
    """Produce one record, waiting while librdkafka's local queue is full (BufferError)."""
    while True:
        try:
            prod.produce(topic, key=key, value=value)
            break
        except BufferError:
            prod.poll(wait_s)
    prod.poll(0)
