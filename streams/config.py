"""One frozen settings object, read from environment variables.

Every field has a documented default; `Settings.from_env()` is the only place that reads
the environment. `python -m streams settings` prints the effective values (secrets masked).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from streams.errors import ConfigError

FUSION_MODES = ("fixed", "attention", "gate")
PROCESSING_GUARANTEES = ("at_least_once", "exactly_once")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVENT_WEIGHTS = "click:1.0,view:0.5,rating:1.0,purchase:1.5"
SECRET_FIELDS = ("kafka_sasl_password", "redis_password", "dashboard_token", "control_secret")


def _default_data_dir() -> Path:
    return PROJECT_ROOT.parent / "shared" / "data" / "ml-100k"


@dataclass(frozen=True)
class Settings:
    # --- where things are -------------------------------------------------------------
    #: KAFKA_BOOTSTRAP_SERVERS: host:port[,host:port]. Unset: the embedded local broker.
    kafka_bootstrap_servers: str | None = None
    #: REDIS_URL: redis://host:port/db. Unset: the embedded local Redis.
    redis_url: str | None = None
    #: BUNDLE_DIR: the model bundle written by `python -m model_export build`.
    bundle_dir: Path = PROJECT_ROOT / "artifacts" / "ml-100k"
    #: BUNDLE_WATCH_S: the worker and the refresher look at BUNDLE_DIR this often and switch,
    #: without a restart, to a bundle published there (0: only on SIGHUP)
    bundle_watch_s: float = 5.0
    #: AB_ARMS: serve variants to users split by a stable hash,
    #: name[=weight]:bundle_dir[@fusion_mode],... (`streams.arms`); empty: BUNDLE_DIR for all
    ab_arms: str = ""
    ab_salt: str = "interest-stream"  #: AB_SALT: a new salt deals the users out afresh
    #: DATA_DIR: MovieLens-100K folder (never committed; read from here).
    data_dir: Path = field(default_factory=_default_data_dir)
    #: STATE_DIR: Faust table stores, local broker/Redis data and logs.
    state_dir: Path = PROJECT_ROOT / ".state"
    # --- topics -----------------------------------------------------------------------
    topic_events: str = "events"  #: TOPIC_EVENTS
    topic_recommendations: str = "recommendations"  #: TOPIC_RECOMMENDATIONS
    topic_dlq: str = "events.dlq"  #: TOPIC_DLQ
    #: TOPIC_CONTROL: privacy erasures (forget); grant write access to the privacy tooling only
    topic_control: str = "events.control"
    partitions: int = 4  #: PARTITIONS (of `events` and the state changelog)
    # --- worker -----------------------------------------------------------------------
    app_id: str = "interest-stream"  #: APP_ID (also the consumer group)
    batch_size: int = 256  #: BATCH_SIZE: events per micro-batch, at most
    batch_overlap: int = 1  #: BATCH_OVERLAP: 1 scores batch k in a thread while k+1 is prepared; 0: one at a time
    batch_within_s: float = 0.005  #: BATCH_WITHIN_S: wait at most this long to fill a batch (latency)
    top_k: int = 10  #: TOP_K
    fusion_mode: str = ""  #: FUSION_MODE: fixed | attention | gate; empty: the bundle's default
    fusion_alpha: float | None = None  #: FUSION_ALPHA: fixed mode's short-term weight; unset: the bundle's
    short_term_len: int = 50  #: SHORT_TERM_LEN: last N items kept per user
    dedup_window: int = 200  #: DEDUP_WINDOW: last M event_ids kept per user
    event_weights: str = DEFAULT_EVENT_WEIGHTS  #: EVENT_WEIGHTS: type:weight,...
    max_payload_bytes: int = 4096  #: MAX_PAYLOAD_BYTES: bigger events are dead-lettered
    max_future_skew_s: float = 300.0  #: MAX_FUTURE_SKEW_S: ts this far ahead is rejected
    processing_guarantee: str = "at_least_once"  #: PROCESSING_GUARANTEE
    commit_interval_s: float = 0.5  #: COMMIT_INTERVAL_S: offsets (and the producer) flushed this often
    #: TRANSACTION_INIT_TIMEOUT_S: exactly-once gives up (one-line error, exit) when the broker
    #: has not started a transaction within this long
    transaction_init_timeout_s: float = 30.0
    #: TRANSACTION_COMMIT_MS: exactly-once commits after each batch once the worker has
    #: caught up (less than BATCH_SIZE records behind), and under a backlog this long after
    #: the transaction began; 0: after every batch. A read_committed consumer sees an output
    #: at its commit, so under a backlog this trades latency for throughput
    transaction_commit_ms: float = 100.0
    #: MAX_CONSECUTIVE_FAILURES: records in a row whose processing fails (each tried twice,
    #: then dead-lettered as processing_failed) before the worker counts the fault as its own
    #: and exits non-zero
    max_consecutive_failures: int = 20
    #: FORGET_WITHIN_S: a forgotten user's earlier state records leave the changelog within
    #: about this long (plus the broker's log cleaner interval): the changelog's compaction
    #: settings, and how often the worker appends to each partition it owns
    #: (`streams.kafka.clients.changelog_configs`)
    forget_within_s: float = 3600.0
    hole_check_s: float = 10.0  #: HOLE_CHECK_S: an input offset still missing after this is looked up in the log
    recovery_stall_s: float = 10.0  #: RECOVERY_STALL_S: a stuck changelog partition is re-read after this
    web_port: int = 6066  #: WEB_PORT: Faust's web server (and /metrics)
    web_host: str = "127.0.0.1"  #: WEB_HOST
    # --- long-term store --------------------------------------------------------------
    long_term_refresh_s: float = 30.0  #: LONG_TERM_REFRESH_S
    long_history_cap: int = 500  #: LONG_HISTORY_CAP: items kept per user in Redis
    redis_timeout_s: float = 0.25  #: REDIS_TIMEOUT_S: slower than this counts as down
    redis_retry_s: float = 2.0  #: REDIS_RETRY_S: wait before trying a down Redis again
    redis_password: str | None = None  #: REDIS_PASSWORD (or put it in REDIS_URL)
    # --- security ---------------------------------------------------------------------
    kafka_security_protocol: str = "PLAINTEXT"  #: KAFKA_SECURITY_PROTOCOL
    kafka_sasl_mechanism: str | None = None  #: KAFKA_SASL_MECHANISM
    kafka_sasl_username: str | None = None  #: KAFKA_SASL_USERNAME
    kafka_sasl_password: str | None = None  #: KAFKA_SASL_PASSWORD
    kafka_ssl_cafile: str | None = None  #: KAFKA_SSL_CAFILE
    dashboard_host: str = "127.0.0.1"  #: DASHBOARD_HOST
    dashboard_port: int = 8050  #: DASHBOARD_PORT
    dashboard_token: str | None = None  #: DASHBOARD_TOKEN: required when not on loopback
    #: CONTROL_SECRET: when set, a forget on the control topic must carry its HMAC-SHA256
    #: signature (`python -m streams forget` signs with it); unsigned ones are dead-lettered
    control_secret: str | None = None
    log_level: str = "INFO"  #: LOG_LEVEL

    def __post_init__(self) -> None:
        if self.fusion_mode and self.fusion_mode not in FUSION_MODES:
            raise ConfigError(
                f"FUSION_MODE={self.fusion_mode!r} is not one of {', '.join(FUSION_MODES)}"
            )
        if self.processing_guarantee not in PROCESSING_GUARANTEES:
            raise ConfigError(
                f"PROCESSING_GUARANTEE={self.processing_guarantee!r} is not one of "
                f"{', '.join(PROCESSING_GUARANTEES)}"
            )
        if self.fusion_alpha is not None and not 0.0 <= self.fusion_alpha <= 1.0:
            raise ConfigError(f"FUSION_ALPHA={self.fusion_alpha} must lie in [0, 1]")
        if not 0 <= self.transaction_commit_ms <= 60_000:
            raise ConfigError(f"TRANSACTION_COMMIT_MS={self.transaction_commit_ms:g} must lie in "
                              "[0, 60000] (under the broker's transaction timeout)")
        if self.forget_within_s < 1:
            raise ConfigError(f"FORGET_WITHIN_S={self.forget_within_s} must be >= 1")
        for name in ("partitions", "batch_size", "top_k", "short_term_len", "dedup_window",
                     "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()}={getattr(self, name)} must be >= 1")
        self.weights()  # validates EVENT_WEIGHTS
        self.arms()  # validates AB_ARMS

    def arms(self):
        """AB_ARMS as a tuple of `streams.arms.Arm` (empty: one model for all)."""
        from streams.arms import parse_arms

        return parse_arms(self.ab_arms)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from `env` (default: os.environ); `overrides` win over both."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update(overrides)
        return cls(**values)

    def weights(self) -> dict[str, float]:
        """EVENT_WEIGHTS as a dict: the event types we accept and how much each counts."""
        out: dict[str, float] = {}
        for part in self.event_weights.split(","):
            name, sep, value = part.strip().partition(":")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ConfigError(
                    f"EVENT_WEIGHTS={self.event_weights!r}: expected type:weight pairs, "
                    f"e.g. {DEFAULT_EVENT_WEIGHTS!r}"
                ) from None
            if not sep or not name.strip():
                raise ConfigError(f"EVENT_WEIGHTS entry {part!r} is not type:weight")
        return out

    def public_dict(self) -> dict:
        """The settings as plain values, secrets masked: safe to log or print."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            elif f.name == "redis_url" and value and "@" in value:
                value = _mask_url(value)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _mask_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _parse(name: str, type_name, raw: str):
    type_name = str(type_name)
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("Path"):
            return Path(raw).expanduser()
    except ValueError:
        raise ConfigError(f"{name.upper()}={raw!r} is not a valid {type_name}") from None
    return raw
