"""`python -m streams evaluate-stream`: replay a recorded stream through the real system
(broker, worker, Redis, refresher) and measure the recommendations prequentially.

Fresh topics and a fresh consumer group each run, so earlier runs do not leak in. Events keep
their recorded timestamps (the gate sees real gaps). The first (1 - test_share) of the events
by time warm the state up; the last test_share are scored: was each event's item in the top-10
published after the same user's previous event? Printed beside the bundle's offline metrics
(leave-one-out, last item per user, full history excluded: a related, not identical, task).
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid

import orjson

from streams.bundle import load_bundle
from streams.config import Settings
from streams.errors import InfraError
from streams.kafka.clients import consumer, ensure_topics, produce, producer
from streams.local.endpoints import given_or_local
from streams.local.stack import LocalStack, free_port
from streams.quality import hit_rate, ndcg
from streams.tools.demo import Children
from streams.tools.online import PrequentialEvaluator, arm_report
from streams.tools.replay import read_recorded


def evaluate_stream(settings: Settings, data, test_share: float = 0.1, limit: int | None = None,
                    timeout_s: float = 120.0, arms: str | None = None) -> dict:
    """With `arms` (AB_ARMS' format; default: the setting), users are split between the arms
    and each arm's online metrics are reported with intervals and against the first arm."""
    tag = uuid.uuid4().hex[:6]
    settings = dataclasses.replace(settings, topic_events=f"eval-events-{tag}",
                                   topic_recommendations=f"eval-recs-{tag}",
                                   topic_dlq=f"eval-dlq-{tag}", topic_control=f"eval-ctl-{tag}",
                                   app_id=f"eval-{tag}",
                                   ab_arms=settings.ab_arms if arms is None else arms)
    variants = {a.name: load_bundle(a.bundle_dir) for a in settings.arms()} or \
        {"": load_bundle(settings.bundle_dir)}
    bundle = next(iter(variants.values()))
    stack = LocalStack(settings.state_dir / f"eval-{tag}")
    children = Children(settings.state_dir / "logs")
    try:
        kafka, redis = given_or_local(settings, stack)
        ensure_topics(settings, kafka)
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka, REDIS_URL=redis,
                   BUNDLE_DIR=str(settings.bundle_dir), WEB_PORT=str(free_port()),
                   TOPIC_EVENTS=settings.topic_events,
                   TOPIC_RECOMMENDATIONS=settings.topic_recommendations,
                   TOPIC_DLQ=settings.topic_dlq, TOPIC_CONTROL=settings.topic_control,
                   APP_ID=settings.app_id, LONG_TERM_REFRESH_S="2",
                   MAX_FUTURE_SKEW_S=str(10**9), AB_ARMS=settings.ab_arms,
                   AB_SALT=settings.ab_salt)
        children.start(f"eval-worker-{tag}", ["worker"], env)
        children.start(f"eval-refresher-{tag}", ["refresher"], env)
        events = list(read_recorded(data, limit))
        test_ids = {e.event_id for e in events[int(len(events) * (1 - test_share)):]}
        started = time.monotonic()
        scored = _run(settings, kafka, events, test_ids, children, timeout_s)
        ranks = [rank for _, _, rank in scored]
        elapsed = time.monotonic() - started
    finally:
        children.stop()
        stack.stop(discard_data=True)
    offline = bundle.manifest.get("metrics", {})
    result = {
        "bundle": bundle.version,
        "events": len(events), "test_events": len(test_ids), "scored": len(ranks),
        "events_per_s": round(len(events) / elapsed, 1),
        "online": {"hr@10": round(hit_rate(ranks, 10), 4), "ndcg@10": round(ndcg(ranks, 10), 4)},
        "offline": {name: {"hr@10": round(m["hr@10"], 4), "ndcg@10": round(m["ndcg@10"], 4)}
                    for name, m in offline.items()},
    }
    if settings.arms():
        result["arms"] = arm_report(scored, 10, control=settings.arms()[0].name)
        for arm, b in variants.items():
            result["arms"][arm]["bundle"] = b.version
    return result


def _run(settings, kafka, events, test_ids, children, timeout_s) -> list[tuple[str, str, int]]:
    """(arm, user, rank) of each test event (arm "" without arms)."""
    cons = consumer(settings, kafka, f"eval-reader-{uuid.uuid4().hex[:6]}")
    cons.subscribe([settings.topic_recommendations])
    prod = producer(settings, kafka)
    for event in events:
        produce(prod, settings.topic_events, event.user_id.encode(), event.to_json())
    prod.flush(60)
    evaluator, ranks, pending = PrequentialEvaluator(k=10), [], {e.event_id for e in events}
    last_progress = time.monotonic()
    try:
        while pending:
            children.check()
            msg = cons.poll(0.2)
            if msg is None or msg.error():
                if time.monotonic() - last_progress > timeout_s:
                    raise InfraError(f"{len(pending)} events without a recommendation after {timeout_s:.0f}s")
                continue
            rec = orjson.loads(msg.value())
            pending.discard(rec["event_id"])
            last_progress = time.monotonic()
            rank = evaluator.update(rec)
            if rank is not None and rec["event_id"] in test_ids:
                ranks.append((rec.get("arm") or "", rec["user_id"], rank))
    finally:
        cons.close()
    return ranks
