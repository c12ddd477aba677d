"""Where Kafka and Redis are: the settings, else the stack started by `python -m streams up`."""
from __future__ import annotations

from streams.config import Settings
from streams.errors import ConfigError
from streams.local.stack import LocalStack, running_endpoints


def resolve_kafka(settings: Settings) -> str:
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    running = running_endpoints(settings.state_dir)
    if running and running.get("kafka"):
        return running["kafka"]
    raise ConfigError(
        "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS=host:port, or start the local one with "
        "`python -m streams up` (or `make demo`)"
    )


def resolve_redis(settings: Settings) -> str | None:
    if settings.redis_url:
        return settings.redis_url
    running = running_endpoints(settings.state_dir)
    return running.get("redis") if running else None


def given_or_local(settings: Settings, stack: LocalStack) -> tuple[str, str]:
    """Kafka and Redis as given (settings, or a running `up` stack); what is missing, `stack`
    starts. The caller stops `stack`, which stops only what it started."""
    try:
        kafka = resolve_kafka(settings)
    except ConfigError:
        kafka = None
    redis = resolve_redis(settings)
    if kafka is None or redis is None:
        endpoints = stack.start(with_kafka=kafka is None, with_redis=redis is None)
        kafka, redis = kafka or endpoints["kafka"], redis or endpoints["redis"]
    return kafka, redis
