"""Putting a job in its arq queue so that tenants share the workers fairly.

arq takes the lowest score first. A plain enqueue scores a job by its arrival time, so one tenant's
10,000 queued jobs would all run before another tenant's single later one. Here each tenant has a
virtual clock per queue (start-time fair queuing): a job's score is the later of the tenant's clock
and the queue head's score, plus a small step, and the clock moves to it. A tenant's burst is spread
behind the head one step apart, and a newcomer lands right behind the head, ahead of that burst. The
arq job record and the queue entry are written in the same Lua call, the way arq's own enqueue does.
"""

from __future__ import annotations

import time

from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

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
return score
"""


async def enqueue(redis: Redis, queue: str, job_id: str, tenant: str | None) -> bool:
    """False when arq already holds a record of this job (it is queued or running)."""
    now_ms = int(time.time() * 1000)
    payload = serialize_job(keys.JOB_FUNCTION, (job_id,), {}, None, now_ms)
    result = await redis.eval(  # type: ignore[misc]
        _ENQUEUE,
        3,
        queue,
        keys.fair_clock(queue),
        job_key_prefix + job_id,
        tenant or "-",
        str(now_ms),
        str(STEP_MS),
        payload,  # type: ignore[arg-type]  # bytes are sent as they are
        str(JOB_TTL_MS),
        job_id,
    )
    return result is not None
