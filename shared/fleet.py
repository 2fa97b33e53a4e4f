"""The live worker fleet: the worker registry in Redis, its one writer (`register`, `deregister`) and its
one reader (`live_workers`; the API, `inferq up`, the reaper and the tests all count workers through it).

Each worker has an entry (a JSON string key with a TTL of a few heartbeats: its liveness) and a member
in the index (a sorted set scored by when the entry expires). Readers take the index's members, then
the entries with one MGET: O(workers), whatever else the Redis holds (by default every job's event
stream too), where a SCAN of the key prefix walked the whole keyspace on every read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from shared import keys

# Index members are pruned this long after the expiry their worker wrote. The entry's own TTL (kept by
# Redis, on one clock) says whether a worker is alive; the score (the worker's clock) only says when a
# member may go, so a worker whose clock is behind the reader's by less than this is never dropped.
PRUNE_AFTER_MS = 60_000


async def register(redis: Redis, info: dict[str, Any], ttl_ms: int) -> None:
    """Write (or refresh) a worker's entry and its index member together: one heartbeat."""
    worker_id = str(info["id"])
    async with redis.pipeline(transaction=True) as pipe:  # one slot ({workers}): a cluster takes it too
        pipe.set(keys.worker_key(worker_id), json.dumps(info), px=ttl_ms)
        pipe.zadd(keys.WORKER_INDEX, {worker_id: int(time.time() * 1000) + ttl_ms})
        await pipe.execute()


async def deregister(redis: Redis, worker_id: str) -> None:
    """A worker that stops cleanly leaves the registry at once instead of when its entry expires."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker_key(worker_id))
        pipe.zrem(keys.WORKER_INDEX, worker_id)
        await pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def live_workers(redis: Redis, *, also: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every worker whose entry has not expired, oldest first. `also`: worker ids to look up even if the
    index lacks them (the reaper passes the workers its running jobs name: a worker of a version older
    than the index writes only its entry, and must not be taken for dead while it beats)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(keys.WORKER_INDEX, "-inf", int(time.time() * 1000) - PRUNE_AFTER_MS)
        pipe.zrange(keys.WORKER_INDEX, 0, -1)
        _, members = await pipe.execute()
    ids = list(dict.fromkeys([*(_text(m) for m in members), *also]))
    if not ids:
        return []
    workers = []
    for raw in await redis.mget([keys.worker_key(i) for i in ids]):
        if raw is None:
            continue  # expired (its member goes later), or never registered
        try:
            workers.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(workers, key=lambda w: (w.get("started_at") or 0, w.get("id") or ""))
