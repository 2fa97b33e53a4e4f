"""Putting a job in its arq queue so that tenants share the workers fairly.

arq takes the lowest score first. A plain enqueue scores a job by its arrival time, so one tenant's
10,000 queued jobs would all run before another tenant's single later one. Here each tenant has a
virtual clock per queue (start-time fair queuing): a job's score is the later of the tenant's clock
and the queue head's score, plus a small step, and the clock moves to it. A tenant's burst is spread
behind the head one step apart, and a newcomer lands right behind the head, ahead of that burst. The
arq job record and the queue entry are written in the same Lua call, the way arq's own enqueue does,
and the queue's wake channel is told, so that idle workers poll at once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from shared import keys

STEP_MS = 0.01  # per-tenant spacing; scores stay floats in milliseconds, as arq's are
JOB_TTL_MS = 86_400_000  # arq's expires_extra_ms default

_ENQUEUE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local floor = tonumber(ARGV[2])
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if head[2] and tonumber(head[2]) < floor then floor = tonumber(head[2]) end
local clock = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if clock < floor then clock = floor end
local score = string.format('%.2f', clock + tonumber(ARGV[3]))
redis.call('HSET', KEYS[2], ARGV[1], score)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PSETEX', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[1], score, ARGV[6])
redis.call('PUBLISH', ARGV[7], '1')
return score
"""


_SHA = hashlib.sha1(_ENQUEUE.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Enqueue:
    queue: str
    job_id: str
    tenant: str | None


def _args(item: Enqueue, now_ms: int) -> tuple[Any, ...]:
    payload = serialize_job(keys.JOB_FUNCTION, (item.job_id,), {}, None, now_ms)
    return (
        3,
        item.queue,
        keys.fair_clock(item.queue),
        keys.ARQ_JOB_PREFIX + item.job_id,
        item.tenant or "-",
        str(now_ms),
        str(STEP_MS),
        payload,  # bytes are sent as they are
        str(JOB_TTL_MS),
        item.job_id,
        keys.wake_channel(item.queue),
    )


async def enqueue_many(redis: Redis, items: Sequence[Enqueue]) -> list[bool | BaseException]:
    """Enqueue every item in one pipelined round trip (EVALSHA, loading the script once if the
    server lacks it). Per item: False when arq already holds a record of that job, or its error."""
    now_ms = int(time.time() * 1000)
    results: list[Any] = []
    for _ in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.evalsha(_SHA, *_args(item, now_ms))
            results = await pipe.execute(raise_on_error=False)
        if not any(isinstance(r, NoScriptError) for r in results):
            break
        await redis.script_load(_ENQUEUE)
    return [r if isinstance(r, BaseException) else r is not None for r in results]


async def enqueue(redis: Redis, queue: str, job_id: str, tenant: str | None) -> bool:
    """False when arq already holds a record of this job (it is queued or running)."""
    (result,) = await enqueue_many(redis, [Enqueue(queue, job_id, tenant)])
    if isinstance(result, BaseException):
        raise result
    return result


async def forget(redis: Redis, job_id: str, queue: str) -> None:
    """The job leaves `queue` and arq forgets it (its record and any in-progress lock)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.ARQ_IN_PROGRESS_PREFIX + job_id, keys.ARQ_JOB_PREFIX + job_id)
        pipe.zrem(queue, job_id)
        await pipe.execute()
