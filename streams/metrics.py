"""Prometheus metrics of the worker and the refresher (served at /metrics)."""
from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, generate_latest

REGISTRY = CollectorRegistry()
GCCollector(registry=REGISTRY)  # python_gc_collections_total{generation=...}: a full one pauses
GC_FROZEN = Gauge("python_gc_frozen_objects", "Objects hidden from the cycle collector at start-up",
                  registry=REGISTRY)
GC_FROZEN.set_function(gc.get_freeze_count)

EVENTS_IN = Counter("events_in_total", "Records read from the events and control topics",
                    registry=REGISTRY)
EVENTS_OUT = Counter("recommendations_out_total", "Recommendations published", registry=REGISTRY)
EVENTS_DLQ = Counter("events_dead_lettered_total", "Records sent to the DLQ", ["reason"],
                     registry=REGISTRY)
DUPLICATES = Counter("events_duplicate_total", "Redelivered events (state left unchanged)",
                     registry=REGISTRY)
DEGRADED = Counter("recommendations_degraded_total",
                   "Recommendations published without the long-term vector (Redis down)",
                   registry=REGISTRY)
BATCH_SIZE = Histogram("batch_size", "Events per micro-batch", registry=REGISTRY,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
INFERENCE_SECONDS = Histogram("inference_seconds", "GPT + fusion time per batch", registry=REGISTRY,
                              buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1))
REDIS_SECONDS = Histogram("redis_seconds", "Redis round trip per batch", registry=REGISTRY,
                          buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1))
REDIS_UP = Gauge("redis_up", "1 when the last Redis round trip succeeded", registry=REGISTRY)
CONSUMER_LAG = Gauge("consumer_lag", "Records behind the end of the events topic", registry=REGISTRY)
BATCH_ERRORS = Counter("batch_errors_total",
                       "Batches that failed (their records are processed again one by one)",
                       registry=REGISTRY)
TRANSACTION_BATCHES = Histogram("transaction_batches",
                                "Exactly-once: micro-batches per commit of the open transactions",
                                registry=REGISTRY, buckets=(1, 2, 3, 5, 10, 20, 50))
TRANSACTION_COMMIT_SECONDS = Histogram(
    "transaction_commit_seconds", "Exactly-once: a commit of the open transactions, from waiting "
    "for the batch in flight to the last partition's commit", registry=REGISTRY,
    buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 5))
TRANSACTIONS_ABORTED = Counter("transactions_aborted_total",
                               "Exactly-once: partitions' transactions aborted (their records "
                               "processed again)", registry=REGISTRY)
RECOVERY_REREADS = Counter("recovery_rereads_total",
                           "Changelog partitions read again after their recovery stalled",
                           registry=REGISTRY)
AGENT_UP = Gauge("agent_up", "1 while the worker's agent runs; 0 once it crashed (the worker "
                 "then exits non-zero)", registry=REGISTRY)
CONTROL_REROUTED = Counter("control_rerouted_total",
                           "Control records re-sent to their user's partition", registry=REGISTRY)
FORGOTTEN = Counter("users_forgotten_total", "Privacy erasures applied", registry=REGISTRY)
REFRESHES = Counter("long_term_refreshed_total", "Long-term vectors recomputed", registry=REGISTRY)
LONG_TERM_STALE = Counter("long_term_stale_total",
                          "Recommendations whose long-term vector missed more events than the "
                          "short-term state keeps (served as refreshed)", registry=REGISTRY)
REFRESH_SECONDS = Histogram("long_term_refresh_seconds", "Duration of one refresh pass",
                            registry=REGISTRY)

BUNDLE_SWAPS = Counter("bundle_swaps_total", "Bundles switched to without a restart",
                       registry=REGISTRY)
BUNDLE_REFUSED = Counter("bundle_refused_total",
                         "Published bundles refused by their checks (the loaded one kept serving)",
                         registry=REGISTRY)
ITEMS_NOT_IN_CATALOG = Counter("state_items_not_in_catalog_total",
                               "Recent items of a user's state left out of scoring because the "
                               "loaded bundle's catalog has no such item", registry=REGISTRY)

# With A/B arms: prequential metrics per arm (was the event's item in the list published after
# the user's previous event?). HR = hits / scored; NDCG's mean and variance from its sums.
ONLINE_SCORED = Counter("online_scored_total", "Events scored against the user's previous list",
                        ["arm"], registry=REGISTRY)
ONLINE_HITS = Counter("online_hits_total", "Scored events whose item was in the previous top-K",
                      ["arm"], registry=REGISTRY)
ONLINE_NDCG = Counter("online_ndcg_sum_total", "Sum of the scored events' NDCG@K", ["arm"],
                      registry=REGISTRY)
ONLINE_NDCG_SQ = Counter("online_ndcg_squares_total", "Sum of the squared NDCG@K", ["arm"],
                         registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
