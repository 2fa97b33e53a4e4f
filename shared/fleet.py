"""The live worker fleet, as its heartbeat keys in Redis describe it: the one reader of the registry
(the API, `inferq up` and the tests all count workers through it)."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from shared import keys


async def live_workers(redis: Redis) -> list[dict[str, Any]]:
    """Every worker whose heartbeat key has not expired, oldest first."""
    names = [name async for name in redis.scan_iter(match=keys.WORKER_PREFIX + "*", count=500)]
    if not names:
        return []
    workers = []
    for raw in await redis.mget(names):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            workers.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(workers, key=lambda w: (w.get("started_at") or 0, w.get("id") or ""))
