"""The embedded default infrastructure: a single-node Apache Kafka (KRaft) and Redis on loopback.

Kafka is assembled from Maven Central (streams/local/pom.xml, resolved once into a cache
folder outside git) and run with `java`; Redis is Debian's `redis-server`. Used by the demo,
the tests and the benchmarks. When KAFKA_BOOTSTRAP_SERVERS / REDIS_URL are set nothing here
is started and those are used instead.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from streams.errors import InfraError

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
# The JVM options Kafka's own start scripts pass (kafka-run-class.sh; a fixed heap as in
# kafka-server-start.sh). With the JVM's defaults (G1 aiming at 200 ms) the broker paused up to
# 90 ms every few seconds under the benchmark's 1,000 events/s: most of the latency tail.
JVM_OPTS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent", "-XX:MaxInlineLevel=15", "-Djava.awt.headless=true")
POM = Path(__file__).resolve().parent / "pom.xml"
CACHE = Path(os.environ.get("INTEREST_STREAM_CACHE", Path.home() / ".cache" / "interest-stream"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kafka_lib_dir() -> Path:
    return Path(os.environ.get("KAFKA_LIB_DIR", CACHE / f"kafka-{KAFKA_VERSION}"))


def ensure_kafka_installed() -> Path:
    """Resolve the broker's jars from Maven Central into the cache (once)."""
    lib = kafka_lib_dir()
    marker = lib / ".complete"
    if marker.is_file():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError("Maven (mvn) is needed once to fetch Apache Kafka: apt-get install maven")
    if shutil.which("java") is None:
        raise InfraError("Java 17+ is needed to run the local Kafka broker: apt-get install openjdk-17-jre")
    lib.mkdir(parents=True, exist_ok=True)
    log.info("resolving Apache Kafka %s from Maven Central into %s", KAFKA_VERSION, lib)
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={lib}", "-DincludeScope=runtime", f"-Dkafka.version={KAFKA_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not list(lib.glob("kafka_2.13-*.jar")):
        raise InfraError(f"could not fetch Kafka with Maven:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    marker.write_text(KAFKA_VERSION)
    return lib


def ensure_redis_installed() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if path:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfraError("redis-server is missing: install Debian's redis-server (apt-get install redis-server)")
    log.info("installing Debian's redis-server")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise InfraError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def _stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class LocalKafka:
    """One KRaft broker+controller process bound to 127.0.0.1."""

    root: Path
    port: int = 0
    controller_port: int = 0
    heap: str = "768m"
    proc: subprocess.Popen | None = None
    ready_seconds: float | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # server.properties entries

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.root / "data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",  # no 3 s wait before a group's first join
            "group.min.session.timeout.ms": "1000",
            "auto.create.topics.enable": "true",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
            # the cleaner looks for logs to compact every second (default 15 s): a forget's
            # erasure of the changelog then takes FORGET_WITHIN_S plus about a second here
            "log.cleaner.backoff.ms": "1000",
        }
        props.update(self.overrides)
        path = self.root / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.root / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self.root / 'server.log'}\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka=INFO\nlog4j.logger.org.apache.kafka=INFO\n")
        return path

    def _java(self, *args: str, gc_log: bool = False) -> list[str]:
        lib = ensure_kafka_installed()
        log_gc = [f"-Xlog:gc*:file={self.root / 'gc.log'}:time,tags:filecount=10,filesize=100M"]
        return ["java", f"-Xms{self.heap}", f"-Xmx{self.heap}", *JVM_OPTS,
                *(log_gc if gc_log else []),
                f"-Dlog4j.configuration=file:{self.root / 'log4j.properties'}",
                "-cp", f"{lib}/*", *args]

    def start(self, timeout: float = 60.0) -> str:
        """Format storage on first start, launch the broker, wait until metadata answers."""
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        config = self._write_config()
        if not (self.root / "data" / "meta.properties").exists():
            cluster_id = uuid.uuid4().hex[:22]
            result = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                                               "-c", str(config)), capture_output=True, text=True)
            if result.returncode != 0:
                raise InfraError(f"kafka storage format failed: {result.stdout}{result.stderr}")
        started = time.monotonic()
        with open(self.root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(self._java("kafka.Kafka", str(config), gc_log=True),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._await_ready(started, timeout)
        self.ready_seconds = time.monotonic() - started
        log.info("Kafka %s ready on %s in %.1fs", KAFKA_VERSION, self.bootstrap, self.ready_seconds)
        return self.bootstrap

    def _await_ready(self, started: float, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = None
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise InfraError(f"Kafka exited with {self.proc.returncode}; see {self.root / 'server.log'}")
            try:
                if admin is None:  # wait for the port first: librdkafka logs every refusal
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    admin = AdminClient({"bootstrap.servers": self.bootstrap})
                metadata = admin.list_topics(timeout=1.0)
                if metadata.brokers:
                    return
            except Exception:  # OSError / KafkaException while the broker starts
                time.sleep(0.1)
        self.stop()
        raise InfraError(f"Kafka not ready after {timeout:.0f}s; see {self.root / 'server.log'}")

    def stop(self) -> None:
        _stop_process(self.proc)
        self.proc = None

    def restart(self, timeout: float = 60.0) -> str:
        """Stop and start again on the same ports with the same data (for fault tests)."""
        self.stop()
        return self.start(timeout)


@dataclass
class LocalRedis:
    root: Path
    port: int = 0
    password: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> str:
        server = ensure_redis_installed()
        self.port = self.port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
               "--save", "", "--appendonly", "no", "--daemonize", "no",
               "--logfile", str(self.root / "redis.log")]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise InfraError(f"redis-server exited; see {self.root / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return self.url
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise InfraError(f"redis-server not ready after {timeout:.0f}s")

    def stop(self) -> None:
        _stop_process(self.proc, timeout=10.0)
        self.proc = None

    def restart(self) -> str:
        self.stop()
        return self.start()


@dataclass
class LocalStack:
    """Kafka and Redis together, with their endpoints written to `root/local.json`."""

    root: Path
    kafka: LocalKafka | None = None
    redis: LocalRedis | None = None

    def start(self, with_kafka: bool = True, with_redis: bool = True) -> dict:
        stop_stale(self.root)
        if with_kafka:
            self.kafka = LocalKafka(self.root / "kafka")
            self.kafka.start()
        if with_redis:
            self.redis = LocalRedis(self.root / "redis")
            self.redis.start()
        endpoints = self.endpoints()
        pids = [p.proc.pid for p in (self.kafka, self.redis) if p and p.proc]
        (self.root / "local.json").write_text(json.dumps(dict(endpoints, pid=os.getpid(), children=pids)))
        return endpoints

    def endpoints(self) -> dict:
        return {"kafka": self.kafka.bootstrap if self.kafka else None,
                "redis": self.redis.url if self.redis else None}

    def stop(self, discard_data: bool = False) -> None:
        """discard_data: a throwaway stack (bench, evaluate-stream) deletes its topics' files
        and keeps its logs; a `make bench` left 2-9 GB of Kafka segments behind without it."""
        if self.redis:
            self.redis.stop()
        if self.kafka:
            self.kafka.stop()
            if discard_data:
                shutil.rmtree(self.kafka.root / "data", ignore_errors=True)
        if self.kafka or self.redis:  # the record is ours only if we started something
            (self.root / "local.json").unlink(missing_ok=True)

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_stale(root: Path, record: str = "local.json", marks: tuple[bytes, ...] = ()) -> None:
    """Stop processes left behind by an owner that died (e.g. a SIGKILLed demo): a broker
    would hold its data directory's lock. `record` names them; a process is only stopped if
    its command line names `root` or one of `marks` (a pid may have been reused)."""
    try:
        info = json.loads((root / record).read_text())
    except (OSError, ValueError):
        return
    if _alive(info.get("pid")):
        return
    redis_port = (info.get("redis") or "").rpartition(":")[2].split("/")[0].encode()
    marks = marks + ((b":" + redis_port,) if redis_port else ())
    for pid in info.get("children", []):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in cmdline or any(m in cmdline for m in marks):
            log.warning("stopping process %s left by a stack whose owner died", pid)
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
    (root / record).unlink(missing_ok=True)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    # a zombie (exited, not yet reaped) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def running_endpoints(state_dir: Path) -> dict | None:
    """Endpoints of a stack started by `python -m streams up`, if it is still running."""
    path = state_dir / "local" / "local.json"
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info
