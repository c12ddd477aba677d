"""The benchmark harness: a broker, Redis and agents to measure (`streams.bench.run` runs it).

Starts its own local broker and Redis (unless KAFKA_BOOTSTRAP_SERVERS/REDIS_URL are set) and
measures, on fresh topics each time:
  throughput   N pre-loaded events through the pipeline worker and through a passthrough
               Faust agent (same run, same broker), plus raw confluent-kafka consume->produce;
               events/s from the first output to the last (emitted_ts of the outputs)
  latency      fixed input rates, event ts -> recommendation arrival at a consumer
  inference    GPT per event in onnxruntime vs torch at batch 1/32/256; long-term refreshes/s
  state        worker RSS after USERS distinct users' state
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson

from streams.bundle import MANIFEST, load_bundle
from streams.bundle_watch import publish
from streams.config import Settings
from streams.errors import InfraError
from streams.events import Event
from streams.kafka.clients import consumer, ensure_topics, produce, producer, tail_consumer
from streams.local.stack import free_port
from streams.tools.demo import Children
from streams.tools.replay import read_recorded

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    mem = next((l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), "")
    return {"cpus": os.cpu_count(), "mem_gb": round(int(mem.split()[1]) / 2**20, 1) if mem else None,
            "python": platform.python_version(), "platform": platform.platform()}


def _cpu_s(stat: Path) -> float:
    """User + system CPU seconds from a /proc `stat` file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_usage(pid: int) -> dict:
    """Peak RSS (MB) and CPU seconds of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM"))
    return {"rss_peak_mb": round(hwm / 1024, 1), "cpu_s": _cpu_s(Path(f"/proc/{pid}/stat"))}


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (a Faust worker's event loop), from /proc."""
    return _cpu_s(Path(f"/proc/{pid}/task/{pid}/stat"))


BENCH_T0 = 1_700_000_000_000  # the synthetic events' first ts (epoch ms)


def base_events(settings: Settings, bundle) -> list[Event]:
    if (settings.data_dir / "u.data").is_file():
        return list(read_recorded(settings.data_dir / "u.data"))
    rng, items = random.Random(0), bundle.items.item_ids
    return [Event(f"s{i}", f"u{rng.randrange(1000)}", rng.choice(items), "click", BENCH_T0 + i)
            for i in range(100_000)]


def stream_of(base: list[Event], n: int) -> list[Event]:
    """n events from the base stream; each repetition gets its own users (realistic state)."""
    out = []
    for i in range(n):
        rnd, e = divmod(i, len(base))
        e = base[e]
        out.append(Event(f"{e.event_id}-{rnd}", f"{e.user_id}-{rnd}" if rnd else e.user_id,
                         e.item_id, e.event_type, e.ts))
    return out


class Bench:
    def __init__(self, settings: Settings, kafka: str, redis: str, log_dir: Path):
        self.settings, self.kafka, self.redis = settings, kafka, redis
        self.children = Children(log_dir)

    def fresh(self, **overrides) -> Settings:
        tag = uuid.uuid4().hex[:6]
        return dataclasses.replace(self.settings, topic_events=f"bench-ev-{tag}",
                                   topic_recommendations=f"bench-out-{tag}", topic_dlq=f"bench-dlq-{tag}",
                                   topic_control=f"bench-ctl-{tag}",
                                   app_id=f"bench-{tag}", kafka_bootstrap_servers=self.kafka,
                                   redis_url=self.redis, **overrides)

    def env(self, s: Settings) -> dict:
        return dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.kafka, REDIS_URL=self.redis,
                    BUNDLE_DIR=str(s.bundle_dir), WEB_PORT=str(free_port()), APP_ID=s.app_id,
                    TOPIC_EVENTS=s.topic_events, TOPIC_RECOMMENDATIONS=s.topic_recommendations,
                    TOPIC_DLQ=s.topic_dlq, TOPIC_CONTROL=s.topic_control,
                    PARTITIONS=str(s.partitions), LOG_LEVEL="WARNING",
                    PROCESSING_GUARANTEE=s.processing_guarantee,
                    TRANSACTION_COMMIT_MS=str(s.transaction_commit_ms),
                    MAX_FUTURE_SKEW_S=str(10**9), STATE_DIR=str(s.state_dir / "bench"))

    def preload(self, s: Settings, events: list[Event], restamp: bool = False) -> None:
        ensure_topics(s, self.kafka)
        prod = producer(s, self.kafka, **{"linger.ms": 20, "batch.num.messages": 10000})
        now = int(time.time() * 1000)
        for e in events:
            value = e.to_json() if not restamp else dataclasses.replace(e, ts=now).to_json()
            produce(prod, s.topic_events, e.user_id.encode(), value)
        if prod.flush(120):
            raise InfraError("preload: events left undelivered")

    def reader(self, s: Settings):
        """A consumer of the outputs fixed at the topic's current end (nothing earlier is read)."""
        return tail_consumer(s, self.kafka, s.topic_recommendations)

    def drain(self, s: Settings, events: list[Event], proc=None, timeout_s: float = 120.0,
              cons=None, on_first=None) -> list[tuple]:
        """Read the outputs of `events`; returns (emitted_ts, event_ts, arrival_ms) per event.

        Only outputs of these events count (an earlier phase's outputs on the same topic
        would otherwise stand in for them, with their much later arrival times). `on_first`
        is called once, when the first of them arrives.
        """
        if cons is None:
            cons = consumer(s, self.kafka, f"bench-read-{uuid.uuid4().hex[:6]}",
                            **{"fetch.min.bytes": 1, "fetch.wait.max.ms": 10})
            cons.subscribe([s.topic_recommendations])
        wanted = {e.event_id for e in events}
        seen, out, last = set(), [], time.monotonic()
        try:
            while len(seen) < len(wanted):
                # consume() waits for the whole timeout unless 1000 are queued: keep it short,
                # or the arrival stamps (latency) gain up to the timeout
                msgs = cons.consume(1000, 0.005)
                arrival = int(time.time() * 1000)
                for msg in msgs:
                    if msg.error():
                        continue
                    rec = orjson.loads(msg.value())
                    if rec["event_id"] in wanted and rec["event_id"] not in seen:
                        if not seen and on_first is not None:
                            on_first()
                        seen.add(rec["event_id"])
                        out.append((rec["emitted_ts"], rec["event_ts"], arrival))
                if msgs:
                    last = time.monotonic()
                elif time.monotonic() - last > timeout_s:
                    raise InfraError(f"only {len(seen)}/{len(wanted)} outputs; see {self.children.log_dir}")
                if proc is not None:
                    self.children.check()
        finally:
            cons.close()
        return out

    def seed_long_term(self, s: Settings, events: list[Event]) -> int:
        """Give every user of `events` a refreshed long-term vector from before their first
        event, so that the worker adds each event to it (the per-event update at its
        costliest: nothing refreshes during a run of a few seconds)."""
        from streams.inference import LongTermEncoder
        from streams.longterm.store import redis_client, write_vectors

        bundle = load_bundle(s.bundle_dir, verify=False)
        encoder = LongTermEncoder(bundle, with_text_encoder=False)
        first = {}
        for e in events:
            first.setdefault(e.user_id, e)
        users = list(first)
        client = redis_client(self.redis, s.redis_password, 10.0, asyncio_client=False)
        try:
            for start in range(0, len(users), 1000):
                chunk = users[start:start + 1000]
                rows = [[bundle.items.row_of[first[u].item_id]] for u in chunk]
                parts = encoder.model_parts(rows)
                write_vectors(client, chunk, parts.h_l, bundle.version, int(time.time() * 1000),
                              parts.pooled, parts.weight,
                              [(first[u].event_id, 0) if parts.pooled is not None else None
                               for u in chunk])
        finally:
            client.close()
        return len(users)

    def agent_throughput(self, command: str, events: list[Event], long_term: bool = True,
                         guarantee: str = "at_least_once", commit_ms: float | None = None
                         ) -> dict:
        """One run of `command` over `events`; the worker's users hold long-term vectors
        unless `long_term` is False (the arm that prices the per-event update). Outputs are
        read read_committed (exactly-once: as its consumers see them); `commit_ms`:
        TRANSACTION_COMMIT_MS (default: the bench's settings)."""
        s = self.fresh(processing_guarantee=guarantee, **_commit_ms(commit_ms))
        self.preload(s, events)
        long_term_users = self.seed_long_term(s, events) if command == "worker" and long_term else 0
        proc = self.children.start(f"bench-{command}-{s.app_id}", [command], self.env(s))
        loop_cpu_s = []  # the event loop's CPU seconds at the first output and after the last
        try:
            out = self.drain(s, events, proc,
                             on_first=lambda: loop_cpu_s.append(main_thread_cpu_s(proc.pid)))
            loop_cpu_s.append(main_thread_cpu_s(proc.pid))
            usage = proc_usage(proc.pid)
        finally:
            self.children.stop()
            self.children.procs.clear()
        emitted = sorted(o[0] for o in out)
        seconds = max((emitted[-1] - emitted[0]) / 1000.0, 1e-3)
        return {"events": len(events), "seconds": round(seconds, 2),
                "events_per_s": round((len(events) - 1) / seconds, 1),
                "long_term_users": long_term_users,
                "rss_mb": usage["rss_peak_mb"],
                "cpu_s_per_1000": round(usage["cpu_s"] / len(events) * 1000, 3),
                # near 1.0: the event loop is the bound (one core, whatever the other threads do)
                "loop_cores": round((loop_cpu_s[1] - loop_cpu_s[0]) / seconds, 2),
                # the event loop's CPU per event: moves far less from run to run than events/s
                "loop_us_per_event": round((loop_cpu_s[1] - loop_cpu_s[0]) * 1e6 / len(events), 1)}

    def throughput_rounds(self, arms: list[tuple], events: list[Event], rounds: int
                          ) -> list[dict]:
        """Each arm's (command, with long-term vectors[, guarantee[, commit ms]]) best of
        `rounds` runs, the arms alternated: noise only slows a run (a broker still warming up
        its JIT and heap, a busy minute), and it hits every arm."""
        runs = {arm: [] for arm in arms}
        for _ in range(max(1, rounds)):
            for arm in arms:
                runs[arm].append(self.agent_throughput(arm[0], events, *arm[1:]))
        return [{**max(r, key=lambda x: x["events_per_s"]),
                 "rounds_events_per_s": [x["events_per_s"] for x in r],
                 "rounds_loop_us_per_event": [x["loop_us_per_event"] for x in r]}
                for r in runs.values()]

    def broker_ceiling(self, events: list[Event]) -> dict:
        """Raw confluent-kafka consume -> produce, one process: what the broker allows here."""
        s = self.fresh()
        self.preload(s, events)
        cons = consumer(s, self.kafka, f"ceiling-{uuid.uuid4().hex[:6]}")
        prod = producer(s, self.kafka, **{"linger.ms": 5})
        cons.subscribe([s.topic_events])
        n, first = 0, None
        while n < len(events):
            msgs = cons.consume(1000, 1.0)
            if msgs and first is None:
                first = time.monotonic()
            for msg in msgs:
                if msg.error():
                    continue
                obj = orjson.loads(msg.value())
                produce(prod, s.topic_recommendations, msg.key(), orjson.dumps(
                    {"event_id": obj["event_id"], "emitted_ts": int(time.time() * 1000)}), 0.01)
                n += 1
        prod.flush(60)
        seconds = time.monotonic() - first
        cons.close()
        return {"events": n, "seconds": round(seconds, 2), "events_per_s": round(n / seconds, 1)}

    def latency(self, events: list[Event], rates: list[int], duration_s: float,
                guarantee: str = "at_least_once", commit_ms: float | None = None) -> dict:
        s = self.fresh(processing_guarantee=guarantee, **_commit_ms(commit_ms))
        ensure_topics(s, self.kafka)
        env, agent = self.env(s), os.environ.get("BENCH_AGENT", "worker")
        proc = self.children.start(f"bench-latency-{s.app_id}", [agent], env)
        # One long-lived producer, as a real source would have: a new idempotent producer
        # holds its first records until it has a producer id, which is not the worker's latency.
        prod = producer(s, self.kafka, **{"linger.ms": 0})
        results = {}
        try:
            self._paced_send(prod, s, events[:200], 200)  # warm-up: group joined, models loaded
            self.drain(s, events[:200], proc)
            offset = 200
            for rate in rates:
                n = int(rate * duration_s)
                batch = events[offset:offset + n]
                offset += n
                cons = self.reader(s)  # fixed before sending: this phase's outputs only
                totals = worker_totals(int(env["WEB_PORT"])) if agent == "worker" else None
                sender = threading.Thread(target=self._paced_send, args=(prod, s, batch, rate), daemon=True)
                sender.start()
                out = self.drain(s, batch, proc, cons=cons)
                sender.join()
                lat = np.array([arrival - event_ts for _, event_ts, arrival in out], dtype=np.float64)
                results[str(rate)] = {"events": len(batch), **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1)
                                                              for q in (50, 95, 99)},
                                      "max_ms": float(lat.max())}
                if totals is not None:  # where the time went, per batch
                    results[str(rate)]["worker_means"] = means_between(
                        totals, worker_totals(int(env["WEB_PORT"])))
            results["rss_mb"] = proc_usage(proc.pid)["rss_peak_mb"]
        finally:
            self.children.stop()
            self.children.procs.clear()
        return results

    def swap_latency(self, events: list[Event], rate: int, duration_s: float, rounds: int) -> dict:
        """Latency at `rate` over minutes with and without a bundle swap in their middle,
        alternated on one worker: the swap's cost is the difference of their p99."""
        s = self.fresh()
        ensure_topics(s, self.kafka)
        location = publish_copies(s.bundle_dir, Path(s.state_dir) / "bench" / f"swap-{s.app_id}")
        copies = [location.with_name("a"), location.with_name("b")]
        env = dict(self.env(s), BUNDLE_DIR=str(location), BUNDLE_WATCH_S="0.5")
        proc = self.children.start(f"bench-swap-{s.app_id}", ["worker"], env)
        prod = producer(s, self.kafka, **{"linger.ms": 0})
        n, arms = int(rate * duration_s), {"steady": [], "swap": []}
        warm = 200 + int(rate * min(duration_s, 60.0))
        try:
            # a minute at the rate, not counted: on a broker started just before, the first
            # minute at 1,000 events/s had a p99 of 2-4 s (docs/benchmarks.md)
            self._paced_send(prod, s, events[:200], 200)
            self._paced_send(prod, s, events[200:warm], rate)
            self.drain(s, events[:warm], proc)
            offset = warm
            for i in range(2 * rounds):
                arm = ("steady", "swap")[i % 2]
                batch, offset = events[offset:offset + n], offset + n
                cons = self.reader(s)
                sender = threading.Thread(target=self._paced_send, args=(prod, s, batch, rate),
                                          daemon=True)
                sender.start()
                if arm == "swap":  # the other copy, half-way through the minute
                    timer = threading.Timer(duration_s / 2, publish, (location, copies[(i // 2 + 1) % 2]))
                    timer.start()
                out = self.drain(s, batch, proc, cons=cons)
                sender.join()
                lat = np.array([arrival - event_ts for _, event_ts, arrival in out], dtype=np.float64)
                arms[arm].append({f"p{q}_ms": round(float(np.percentile(lat, q)), 1)
                                  for q in (50, 99)} | {"max_ms": float(lat.max())})
            swaps = worker_models(int(env["WEB_PORT"]))["arms"][""]["swaps"]  # each swap arm's swap done?
        finally:
            self.children.stop()
            self.children.procs.clear()
        typical = {arm: float(np.median([r["p99_ms"] for r in runs])) for arm, runs in arms.items()}
        return {"rate": rate, "duration_s": duration_s, **arms, "swaps": swaps,
                "p99_added_ms": round(typical["swap"] - typical["steady"], 1)}

    @staticmethod
    def _paced_send(prod, s: Settings, events: list[Event], rate: float) -> None:
        start = time.monotonic()
        for i, e in enumerate(events):
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            prod.produce(s.topic_events, key=e.user_id.encode(),
                         value=dataclasses.replace(e, ts=int(time.time() * 1000)).to_json())
            prod.poll(0)
        prod.flush(30)

    def state_size(self, base: list[Event], users: int) -> dict:
        """Worker RSS once `users` distinct users have short-term state (2 events each)."""
        events = [Event(f"st-{u}-{j}", f"st{u}", base[(u * 2 + j) % len(base)].item_id, "click",
                        BENCH_T0 + j) for u in range(users) for j in range(2)]
        result = self.agent_throughput("worker", events)
        return {"users": users, "events": len(events), "rss_mb": result["rss_mb"],
                "events_per_s": result["events_per_s"]}


def worker_models(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=5) as reply:
        return json.loads(reply.read())


# the worker's per-batch histograms whose means say where an output's latency goes
BATCH_METRICS = ("batch_size", "redis_seconds", "inference_seconds", "transaction_commit_seconds")


def worker_metrics(port: int) -> dict[str, float]:
    """The worker's /metrics: each sample's name (labels included) and value."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def worker_totals(port: int, names: tuple[str, ...] = BATCH_METRICS) -> dict:
    """Each of the worker's histograms `names`: (count, sum) so far."""
    values = worker_metrics(port)
    return {name: (values.get(f"{name}_count", 0.0), values.get(f"{name}_sum", 0.0))
            for name in names}


def means_between(before: dict, after: dict) -> dict:
    """Each histogram's mean over what it observed between two `worker_totals` (ms for
    seconds); one that observed nothing is left out."""
    out = {}
    for name, (count, total) in after.items():
        n = count - before[name][0]
        if n:
            mean = (total - before[name][1]) / n
            out[name.replace("_seconds", "_ms")] = round(
                mean * 1000 if name.endswith("_seconds") else mean, 2)
    return out


def publish_copies(bundle: Path, root: Path) -> Path:
    """Two bundles a and b that differ only in their version (their files link to `bundle`'s),
    and the location `current`, pointing at a."""
    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    for name in ("a", "b"):
        copy = root / name
        copy.mkdir(parents=True, exist_ok=True)
        for f in Path(bundle).iterdir():
            if f.name != MANIFEST and not (copy / f.name).exists():
                (copy / f.name).symlink_to(f.resolve())
        (copy / MANIFEST).write_text(json.dumps(dict(manifest, version=f"{manifest['version']}-{name}")))
    publish(root / "current", root / "a")
    return root / "current"


def _commit_ms(commit_ms: float | None) -> dict:
    return {} if commit_ms is None else {"transaction_commit_ms": commit_ms}
