"""`make demo`: bring everything up, feed a stream, show what is published, tear down.

Starts (unless KAFKA_BOOTSTRAP_SERVERS / REDIS_URL point elsewhere) the local broker and
Redis, builds the ml-100k bundle if there is none (the synthetic one when the MovieLens
files are absent), runs the worker and the refresher as child processes, replays events
and prints the recommendations as they arrive. `--events N` runs headless and exits 0 once
N recommendations came back; otherwise it runs until Ctrl-C. Everything it started stops.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from streams.bundle import FORMAT_VERSION, MANIFEST, load_bundle
from streams.config import Settings
from streams.errors import InfraError
from streams.events import Event
from streams.kafka.clients import ensure_topics, producer, tail_consumer
from streams.local.endpoints import given_or_local
from streams.local.stack import LocalStack, free_port, stop_stale
from streams.tools.replay import read_recorded

log = logging.getLogger(__name__)


def ensure_bundle(settings: Settings, quick: bool) -> None:
    data = settings.data_dir if (settings.data_dir / "u.data").is_file() else None
    manifest = settings.bundle_dir / MANIFEST
    if manifest.is_file():
        built = json.loads(manifest.read_text())
        if built.get("format") != FORMAT_VERSION:
            print(f"{settings.bundle_dir} has bundle format {built.get('format')!r}, this code "
                  f"reads {FORMAT_VERSION}: rebuilding it.")
        elif data is not None and built.get("dataset") == "synthetic":
            print(f"{settings.bundle_dir} was built on the synthetic stream and MovieLens is now "
                  f"in {settings.data_dir}: rebuilding it on ml-100k.")
        else:
            return
    if data is None:
        print(f"MovieLens-100K not found in {settings.data_dir} (put u.data and u.item there, "
              f"or set DATA_DIR); building a bundle on the synthetic stream instead.")
    print(f"Building the model bundle at {settings.bundle_dir} (progress below).", flush=True)
    cmd = [sys.executable, "-m", "model_export", "build", "--out", str(settings.bundle_dir),
           "--data", str(data) if data else "synthetic"] + (["--quick"] if quick else [])
    if subprocess.run(cmd).returncode != 0:
        raise InfraError("building the model bundle failed (see above)")


def demo_events(settings: Settings, bundle, limit: int | None):
    """ml-100k in time order when present, else random users over the bundle's catalog.

    Event ids are deterministic; ts is stamped at send time so latencies are real.
    """
    if (settings.data_dir / "u.data").is_file():
        yield from read_recorded(settings.data_dir / "u.data", limit=limit)
        return
    rng = random.Random(0)
    items = bundle.items.item_ids
    for n in range(limit or 10**12):
        yield Event(f"demo-{n}", f"u{rng.randrange(200)}", rng.choice(items), "click", 0)


class Children:
    """Child processes (worker, refresher) with logs in files; all stopped on exit."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, []
        log_dir.mkdir(parents=True, exist_ok=True)
        stop_stale(log_dir, "children.json", marks=(b"-m\x00streams",))

    def _record(self) -> None:
        (self.log_dir / "children.json").write_text(json.dumps(
            {"pid": os.getpid(), "children": [p.pid for _, p in self.procs]}))

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "streams", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        self._record()
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise InfraError(f"{name} exited with {proc.returncode}; see {self.log_dir / name}.log")

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        (self.log_dir / "children.json").unlink(missing_ok=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(settings: Settings, events: int = 0, rate: float = 20.0, quick: bool = False) -> int:
    # SIGTERM/SIGHUP (a closed terminal, `timeout`, CI) must also stop what the demo started
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    ensure_bundle(settings, quick)
    bundle = load_bundle(settings.bundle_dir)
    stack = LocalStack(settings.state_dir / "local")
    children = Children(settings.state_dir / "logs")
    try:
        kafka, redis_url = given_or_local(settings, stack)
        if stack.kafka:
            print(f"Kafka ready on {kafka} in {stack.kafka.ready_seconds:.1f}s; Redis on {redis_url}")
        ensure_topics(settings, kafka)
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka, REDIS_URL=redis_url,
                   BUNDLE_DIR=str(settings.bundle_dir), WEB_PORT=str(free_port()),
                   LONG_TERM_REFRESH_S=str(min(settings.long_term_refresh_s, 5.0)))
        children.start("worker", ["worker"], env)
        children.start("refresher", ["refresher"], env)
        wait_ready(int(env["WEB_PORT"]), children)
        port = settings.dashboard_port if _port_free(settings.dashboard_port) else free_port()
        children.start("dashboard", ["dashboard"], dict(env, DASHBOARD_PORT=str(port)))
        print(f"worker, refresher and dashboard started (logs in {children.log_dir})")
        print(f"dashboard: http://{settings.dashboard_host}:{port}/", flush=True)
        return _feed_and_show(settings, kafka, bundle, events, rate, children)
    finally:
        children.stop()
        stack.stop()


def _feed_and_show(settings, kafka, bundle, n_events, rate, children) -> int:
    out = tail_consumer(settings, kafka, settings.topic_recommendations)
    prod = producer(settings, kafka)
    source = demo_events(settings, bundle, n_events or None)
    sent, received, wanted, started = 0, 0, set(), time.monotonic()
    last_progress = time.monotonic()
    try:
        while True:
            children.check()
            due = int((time.monotonic() - started) * rate) + 1
            while sent < due and (not n_events or sent < n_events):
                event = next(source, None)
                if event is None:
                    n_events = n_events or sent
                    break
                event = dataclasses.replace(event, ts=int(time.time() * 1000))
                prod.produce(settings.topic_events, key=event.user_id.encode(), value=event.to_json())
                wanted.add(event.event_id)
                sent += 1
            prod.poll(0)
            msg = out.poll(0.05)
            if msg is not None and not msg.error():
                rec = orjson.loads(msg.value())
                if rec["event_id"] in wanted:
                    wanted.discard(rec["event_id"])
                    received += 1
                    last_progress = time.monotonic()
                    _show(rec, received)
            if n_events and received >= n_events:
                break
            if n_events and time.monotonic() - last_progress > 120:
                raise InfraError(f"only {received}/{n_events} recommendations after 120 s without progress")
    except KeyboardInterrupt:
        pass
    finally:
        prod.flush(10)
        out.close()
    elapsed = time.monotonic() - started
    print(f"published {received} recommendations for {sent} events in {elapsed:.1f}s "
          f"({received / max(elapsed, 1e-9):.1f}/s)")
    return 0


def wait_ready(port: int, children: Children, timeout_s: float = 180.0) -> None:
    """Wait until the worker has its partitions and their state (its /healthz `ready`), so the
    first events are served at once rather than queued behind the group join."""
    import urllib.request

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        children.check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                if json.loads(reply.read()).get("ready"):
                    print(f"worker ready in {time.monotonic() - started:.1f}s", flush=True)
                    return
        except OSError:  # not listening yet, or 503
            pass
        time.sleep(0.2)
    raise InfraError(f"the worker was not ready after {timeout_s:.0f}s; see "
                     f"{children.log_dir / 'worker.log'}")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _show(rec: dict, n: int) -> None:
    top = ", ".join(i.get("title") or i["item_id"] for i in rec["items"][:3])
    lt = rec["long_term"]
    lt_text = f"long-term v{lt['version']} {lt['age_s']:.0f}s old" if lt else "short-term only"
    latency = rec["emitted_ts"] - rec["event_ts"]
    print(f"[{n}] user {rec['user_id']}: {top} | alpha={rec['alpha']:.2f} {rec['fusion_mode']}, "
          f"{lt_text}, {latency} ms", flush=True)
