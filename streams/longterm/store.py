"""Redis access: each user's long history, the dirty set, and versioned long-term vectors.

Keys (prefix `is:`):
  is:hist:{user}  list of "item_id" or "item_id<TAB>weight" (event-type weight != 1),
                  oldest first, capped at LONG_HISTORY_CAP
  is:hpos:{user}  hash {since, pos}: the place in the user's history of the newest event
                  appended (`streams.state`): an append at or before it is a retry, skipped
  is:dirty        set of users whose history changed since their last refresh
  is:lt:{user}    hash {vec: float32 bytes, version: int, ts: epoch ms, model: bundle version,
                  and for an incremental long-term model: pooled (float32 bytes), weight,
                  since, pos: the weighted mean it came from and the history place it covers}

A vector, its version and its time live in one hash written in one MULTI/EXEC, so a reader
never sees a half-written value. When Redis is down or slow the worker keeps going without
long-term vectors (degraded) and keeps the history appends it could not write in a bounded
buffer that is flushed when Redis answers again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)
PREFIX = "is:"
DIRTY = f"{PREFIX}dirty"
PENDING_CAP = 200_000


# One batch in one command: read the users' vectors, append the events to the histories, cap
# them, mark their users dirty. KEYS = dirty set, n vector keys, m history keys and m place
# keys (one each per append); ARGV = n, cap, then per append: user, entry, lineage, position.
# An append at or before the place its user's history last recorded in the same lineage is a
# retry (a write that timed out on the worker's side and ran later): skipped, so a history
# never counts an event twice. Sent as one EVAL instead of ~2 commands per event (redis-py
# packs and parses each in Python: 15-33 us per event on the event loop).
VECTOR_FIELDS = ("vec", "version", "ts", "model", "pooled", "weight", "since", "pos")
SYNC_BATCH = """
local VECTOR_FIELDS = {%s}
local n, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local m = (#KEYS - 1 - n) / 2
local vectors, dirty, places = {}, {}, {}
for i = 1, n do
  vectors[i] = redis.call('HMGET', KEYS[1 + i], unpack(VECTOR_FIELDS))
end
for j = 1, m do
  local hist, place = KEYS[1 + n + j], KEYS[1 + n + m + j]
  local at = 2 + 4 * (j - 1)
  local since, pos = ARGV[at + 3], tonumber(ARGV[at + 4])
  local known = places[place]
  if not known then  -- read once per user and batch, written back once below
    local stored = redis.call('HMGET', place, 'since', 'pos')
    known = {since = stored[1], pos = tonumber(stored[2]), changed = false}
    places[place] = known
  end
  if known.since ~= since or not known.pos or pos > known.pos then
    redis.call('RPUSH', hist, ARGV[at + 2])
    known.since, known.pos, known.changed = since, pos, true
    dirty[hist] = ARGV[at + 1]
  end
end
for place, known in pairs(places) do
  if known.changed then
    redis.call('HSET', place, 'since', known.since, 'pos', known.pos)
  end
end
for key, user in pairs(dirty) do
  redis.call('LTRIM', key, -cap, -1)
  redis.call('SADD', KEYS[1], user)
end
return vectors
""" % ", ".join(f"'{f}'" for f in VECTOR_FIELDS)


class HistoryAppend(NamedTuple):
    """One event for a user's long history, with its place in it (`streams.state`). The fields
    are in SYNC_BATCH's ARGV order: the script's arguments are the tuples laid end to end."""

    user: str
    entry: str  # history_entry(item_id, weight)
    since: str
    pos: int


def hist_key(user: str) -> str:
    return f"{PREFIX}hist:{user}"


def vec_key(user: str) -> str:
    return f"{PREFIX}lt:{user}"


def place_key(user: str) -> str:
    return f"{PREFIX}hpos:{user}"


def queue_erase(pipe, user: str) -> None:
    """Add to `pipe` what erases a user: history, its place, vector, dirty mark (2 replies)."""
    pipe.delete(hist_key(user), place_key(user), vec_key(user))
    pipe.srem(DIRTY, user)


@dataclass(frozen=True)
class LongTermVector:
    vec: np.ndarray
    version: int
    ts_ms: int
    pooled: np.ndarray | None = None  # an incremental model's weighted mean, and its weight
    weight: float = 0.0
    place: tuple[str, int] | None = None  # (lineage, position) of the newest event it covers
    model: str | None = None  # the bundle version that wrote it

    def age_s(self, now_ms: int) -> float:
        return max(0.0, (now_ms - self.ts_ms) / 1000.0)


def parse_vector(fields: Sequence, model: str, d_model: int) -> LongTermVector | None:
    """HMGET reply (VECTOR_FIELDS) -> a vector, or None if absent or from another model."""
    vec, version, ts, owner, pooled, weight, since, pos = (*fields, None, None, None, None)[:8]
    if vec is None or version is None or ts is None:
        return None
    owner = None if owner is None else owner.decode()
    if owner is not None and owner != model:
        return None  # written by another bundle: a different projection, unusable here
    arr = np.frombuffer(vec, dtype=np.float32)
    if arr.shape != (d_model,):
        return None
    if pooled is None or weight is None or since is None or pos is None:
        return LongTermVector(arr, int(version), int(ts), model=owner)
    return LongTermVector(arr, int(version), int(ts), np.frombuffer(pooled, dtype=np.float32),
                          float(weight), (since.decode(), int(pos)), owner)


def redis_client(url: str, password: str | None, timeout: float, asyncio_client: bool = True):
    import redis
    import redis.asyncio as aredis

    module = aredis if asyncio_client else redis
    return module.Redis.from_url(url, password=password or None, socket_timeout=timeout,
                                 socket_connect_timeout=timeout, health_check_interval=0)


class LongTermStore:
    """The worker's side: one pipelined round trip per micro-batch."""

    def __init__(self, client, model: str, d_model: int, history_cap: int,
                 timeout_s: float, retry_s: float):
        self.client = client
        self.model, self.d_model = model, d_model  # whose vectors to read, unless told per user
        self.history_cap = history_cap
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.pending: deque[HistoryAppend] = deque(maxlen=PENDING_CAP)
        self.down_until = 0.0
        self.up = True
        self.pending_forgets: set[str] = set()  # erasures to redo when Redis is back
        self._lock = asyncio.Lock()

    async def retry_pending(self) -> None:
        """Write what waits for a Redis that was down, without waiting for the next batch
        (called periodically: a quiet stream would otherwise keep it until more events)."""
        if not self.up and (self.pending or self.pending_forgets):
            await self.sync_batch((), ())

    async def sync_batch(self, appends: Iterable[HistoryAppend], users: Sequence[str],
                         models: Sequence[tuple[str, int]] | None = None
                         ) -> dict[str, LongTermVector] | None:
        """Append events to the histories, mark those users dirty, read the users' vectors:
        each only if written by the bundle `models` gives for it, (version, d_model) per user
        (default: the store's own).

        Returns None when Redis is unavailable (the caller publishes degraded output).
        """
        self.pending.extend(appends)
        if time.monotonic() < self.down_until:
            return None
        async with self._lock:  # one round trip at a time: each pops what it sent
            return await self._sync(users, models)

    async def _sync(self, users: Sequence[str], models=None) -> dict[str, LongTermVector] | None:
        batch_appends = list(self.pending)
        forgets = list(self.pending_forgets)
        pipe = self.client.pipeline(transaction=False)
        for user in forgets:
            queue_erase(pipe, user)
        keys = [DIRTY, *map(vec_key, users), *(hist_key(a.user) for a in batch_appends),
                *(place_key(a.user) for a in batch_appends)]
        args = [len(users), self.history_cap, *chain.from_iterable(batch_appends)]
        pipe.eval(SYNC_BATCH, len(keys), *keys, *args)
        try:
            replies = await asyncio.wait_for(pipe.execute(), self.timeout_s * 4)
        except Exception as exc:  # ConnectionError, TimeoutError, RedisError ...
            self._mark_down(exc)
            return None
        for _ in batch_appends:
            self.pending.popleft()
        self.pending_forgets.difference_update(forgets)
        vectors = replies[2 * len(forgets)]
        if not self.up:
            log.info("Redis is back; long-term vectors restored")
        self.up = True
        models = models or [(self.model, self.d_model)] * len(users)
        return {user: v for user, fields, (model, d) in zip(users, vectors, models)
                if (v := parse_vector(fields, model, d)) is not None}

    async def forget(self, user: str) -> None:
        """Erase the user's history, vector and dirty mark (and appends still pending)."""
        async with self._lock:
            await self._forget(user)

    async def _forget(self, user: str) -> None:
        self.pending = deque((a for a in self.pending if a.user != user), maxlen=PENDING_CAP)
        pipe = self.client.pipeline(transaction=True)
        queue_erase(pipe, user)
        try:
            await asyncio.wait_for(pipe.execute(), self.timeout_s * 4)
        except Exception as exc:
            self._mark_down(exc)
            self.pending_forgets.add(user)

    def _mark_down(self, exc: Exception) -> None:
        if self.up:
            log.warning("Redis unavailable (%s: %s); publishing short-term only, retry in %.1fs",
                        type(exc).__name__, exc, self.retry_s)
        self.up = False
        self.down_until = time.monotonic() + self.retry_s

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:
            pass


# --- synchronous helpers (refresher, privacy, tests) -------------------------------------

def take_dirty(client, count: int) -> list[str]:
    users = client.spop(DIRTY, count) or []
    return [u.decode() if isinstance(u, bytes) else u for u in users]


def history_entry(item_id: str, weight: float) -> str:
    return item_id if weight == 1.0 else f"{item_id}\t{weight:g}"


def parse_entry(entry: str) -> tuple[str, float]:
    item, tab, weight = entry.rpartition("\t")
    if not tab:
        return entry, 1.0
    try:
        return item, float(weight)
    except ValueError:
        return entry, 1.0


def read_histories(client, users: Sequence[str]) -> list[list[tuple[str, float]]]:
    """Each user's long history as (item_id, event weight), oldest first."""
    return read_histories_at(client, users)[0]


def read_histories_at(client, users: Sequence[str]
                      ) -> tuple[list[list[tuple[str, float]]], list[tuple[str, int] | None]]:
    """Each user's long history and the place of its newest event, read in one MULTI/EXEC so
    that the place is the history's own."""
    pipe = client.pipeline(transaction=True)
    for user in users:
        pipe.lrange(hist_key(user), 0, -1)
        pipe.hmget(place_key(user), "since", "pos")
    replies = pipe.execute()
    histories = [[parse_entry(item.decode()) for item in items] for items in replies[0::2]]
    places = [None if pos is None else (since.decode() if since is not None else "", int(pos))
              for since, pos in replies[1::2]]
    return histories, places


def write_vectors(client, users: Sequence[str], vectors: np.ndarray, model: str, now_ms: int,
                  pooled: np.ndarray | None = None, weights: Sequence[float] | None = None,
                  places: Sequence[tuple[str, int] | None] | None = None) -> None:
    """Write every user's vector, bumping its version, in one MULTI/EXEC. With `pooled`, each
    vector's weighted mean, total weight and history place go with it (a worker then adds the
    events after that place); a vector without them has them removed."""
    pipe = client.pipeline(transaction=True)
    for i, (user, vec) in enumerate(zip(users, vectors)):
        pipe.hincrby(vec_key(user), "version", 1)
        fields = {"vec": np.asarray(vec, np.float32).tobytes(), "ts": now_ms, "model": model}
        place = places[i] if places is not None else None
        if pooled is not None and place is not None:
            fields.update(pooled=np.asarray(pooled[i], np.float32).tobytes(),
                          weight=float(weights[i]), since=place[0], pos=place[1])
        else:
            pipe.hdel(vec_key(user), "pooled", "weight", "since", "pos")
        pipe.hset(vec_key(user), mapping=fields)
    pipe.execute()


def read_vector(client, user: str, model: str, d_model: int) -> LongTermVector | None:
    return parse_vector(client.hmget(vec_key(user), *VECTOR_FIELDS), model, d_model)


def queue_reencoding(client, model_of: Callable[[str], str], chunk: int = 1000) -> int:
    """Mark dirty every user whose vector was written by another bundle than `model_of(user)`
    (after the refresher switched bundles), so that the refresh passes re-encode them;
    returns how many."""
    queued, keys = 0, []
    for key in chain(client.scan_iter(match=f"{PREFIX}lt:*", count=chunk), [None]):
        if key is not None:
            keys.append(key)
        if keys and (key is None or len(keys) >= chunk):
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.hget(k, "model")
            owners = pipe.execute()
            users = [u for u, owner in zip((k.decode()[len(vec_key("")):] for k in keys), owners)
                     if owner is None or owner.decode() != model_of(u)]
            if users:
                client.sadd(DIRTY, *users)
            queued, keys = queued + len(users), []
    return queued


def forget_user(client, user: str) -> int:
    """Remove everything Redis holds about `user`; returns how many keys it found (0 when a
    worker had erased them already)."""
    pipe = client.pipeline(transaction=True)
    queue_erase(pipe, user)
    return int(pipe.execute()[0])
