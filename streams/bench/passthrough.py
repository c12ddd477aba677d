"""The benchmark's baseline: a Faust agent that decodes, encodes and sends; no model, no Redis.

Same app settings and micro-batching as the real worker, so the ratio between the two shows
what the models and Redis cost. Run with `python -m streams passthrough`.
"""
from __future__ import annotations

import time

import orjson

from streams.config import Settings
from streams.worker.app import create_app, send_raw, settle_heap

settings = Settings.from_env()
app = create_app(settings)
events_topic = app.topic(settings.topic_events, key_serializer="raw", value_serializer="raw",
                         partitions=settings.partitions)


@app.agent(events_topic, name="passthrough")
async def passthrough(stream):
    settle_heap()  # as the worker does
    async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        now = int(time.time() * 1000)
        for event in events:
            obj = orjson.loads(event.value)
            # sent as the worker sends its outputs (at-least-once)
            await send_raw(app, settings.topic_recommendations, event.key, orjson.dumps(
                {"event_id": obj["event_id"], "user_id": obj["user_id"], "event_ts": obj["ts"],
                 "emitted_ts": now}))
