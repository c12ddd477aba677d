"""Shared fixtures: the real local Kafka + Redis (or the ones named by env), a quick bundle."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from streams.config import Settings
from streams.local.stack import LocalStack, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Endpoints of a real broker and Redis: started here unless KAFKA_BOOTSTRAP_SERVERS/REDIS_URL."""
    env_kafka, env_redis = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
    local = LocalStack(tmp_path_factory.mktemp("infra"))
    local.start(with_kafka=not env_kafka, with_redis=not env_redis)
    endpoints = {"kafka": env_kafka or local.kafka.bootstrap, "redis": env_redis or local.redis.url,
                 "local": local}
    yield endpoints
    local.stop()


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory) -> Path:
    """A quick bundle built once per session from the synthetic stream."""
    from model_export import data
    from model_export.build import build
    from model_export.train import TrainConfig
    from model_export.train_long_term import LongTermTrainConfig

    out = tmp_path_factory.mktemp("bundle")
    cfg = TrainConfig(epochs=12, fusion_epochs=3, progress=False)
    build(data.synthetic(n_users=200, n_items=240, events_per_user=30, seed=1), out,
          {"max_len": 20}, cfg, long_train=LongTermTrainConfig(max_epochs=10, half_lives=(1e9,),
                                                               use_text=(True,), progress=False))
    return out


@pytest.fixture
def redis_sync(stack):
    """A synchronous client of the test Redis."""
    from streams.longterm.store import redis_client

    client = redis_client(stack["redis"], None, timeout=5.0, asyncio_client=False)
    yield client
    client.close()


def unique_settings(stack, bundle: Path | None = None, **overrides) -> Settings:
    """Settings with topics and group of their own, so tests never see each other's records."""
    tag = uuid.uuid4().hex[:8]
    values = dict(kafka_bootstrap_servers=stack["kafka"], redis_url=stack["redis"],
                  topic_events=f"events-{tag}", topic_recommendations=f"recs-{tag}",
                  topic_dlq=f"dlq-{tag}", topic_control=f"control-{tag}", app_id=f"test-{tag}",
                  partitions=2)
    if bundle is not None:
        values["bundle_dir"] = bundle
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict:
    env = dict(os.environ)
    for key, value in settings.public_dict().items():
        if value is not None and key not in ("data_dir",):
            env[key.upper()] = str(value)
    from streams.config import SECRET_FIELDS

    for secret in SECRET_FIELDS:
        if getattr(settings, secret):
            env[secret.upper()] = getattr(settings, secret)
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    return env


class WorkerProcess:
    """`python -m streams worker` as a child process with its own web port and log file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str = "worker",
                 argv: tuple = ("-m", "streams", "worker"), **env_overrides):
        self.settings, self.name, self.argv = settings, name, argv
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.env = settings_env(settings)
        self.env["WEB_PORT"] = str(free_port())
        self.env["STATE_DIR"] = str(log_dir / "state")
        self.env.update({k: str(v) for k, v in env_overrides.items()})
        self.proc = None

    def start(self) -> "WorkerProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, *self.argv], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.tail()}")
            if b"Worker]: Ready" in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout}s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def workers(tmp_path):
    started = []

    def start(settings: Settings, ready: bool = True, argv: tuple = ("-m", "streams", "worker"),
              **env) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path, f"worker{len(started)}", argv, **env).start()
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
