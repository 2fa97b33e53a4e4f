"""What a running job reads and writes outside the engine: its row in Postgres (the claim, the one
guarded final write, handing it back to the queue, expiring it), its cancel flag and published events in
Redis (what a re-run continues), its API key's quota counter, and its output webhooks' outbox rows."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Interval, func, literal_column, or_
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import keys
from shared.deadlines import expire_unstarted
from shared.eventredis import EventsRedis
from shared.events import logprobs_of, read_events, text_of
from shared.models import Job
from shared.states import JobStatus
from shared.transitions import move
from shared.webhooks import queue_output_delivery

log = logging.getLogger(__name__)

# Postgres being unreachable: the worker waits for it rather than lose a result.
DB_DOWN = (OperationalError, DBAPIError, OSError)
WRITE_BACKOFF_MAX_SECONDS = 5.0


@dataclass
class Claim:
    request: dict[str, Any]
    attempt: int
    created_at: datetime
    started_at: datetime
    request_id: str | None
    prompt_tokens: int | None = None
    deadline_at: datetime | None = None
    tenant: str | None = None

    @classmethod
    def of(cls, row: Any) -> Claim:
        """A claimed job's row, as claim_statement returns it."""
        return cls(
            dict(row.request),
            int(row.attempts),
            row.created_at,
            row.started_at,
            row.request_id,
            row.prompt_tokens,
            row.deadline_at,
            row.tenant,
        )


@dataclass
class Published:
    """What earlier attempts of a job published: per output its text and that text's tokens' logprobs,
    and the index of the next token event."""

    texts: list[str]
    next_index: int
    logprobs: list[list[dict[str, Any]]]

    @classmethod
    def nothing(cls, n: int, next_index: int = 0) -> Published:
        return cls([""] * n, next_index, [[] for _ in range(n)])


def claim_statement(which: Any, worker_id: str) -> Any:
    """Queued -> running for the jobs `which` selects, unless a job's deadline passed before it ever
    started. The running-time bound joins the deadline: LEAST keeps the earlier, so a retried job keeps
    its first one. Returns each claimed job's id and what Claim.of reads."""
    second = literal_column("interval '1 second'", Interval)
    return move(
        JobStatus.RUNNING,
        which,
        or_(Job.deadline_at.is_(None), Job.attempts > 0, Job.deadline_at > func.clock_timestamp()),
        src=JobStatus.QUEUED,
        attempts=Job.attempts + 1,
        worker_id=worker_id,
        started_at=func.clock_timestamp(),
        deadline_at=func.least(Job.deadline_at, func.clock_timestamp() + Job.timeout_seconds * second),
    ).returning(
        Job.id,
        Job.request,
        Job.attempts,
        Job.created_at,
        Job.started_at,
        Job.request_id,
        Job.prompt_tokens,
        Job.deadline_at,
        Job.tenant,
    )


class JobStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        redis: Redis,
        events_redis: EventsRedis,
        worker_id: str,
    ) -> None:
        self.sessions = sessions
        self.redis = redis  # the queue's: quota counters
        self.events_redis = events_redis  # job events and cancel flags (the cluster, when there is one)
        self.worker_id = worker_id

    async def claim(self, job_id: str) -> Claim | None:
        """Queued -> running, unless its deadline passed before it ever started. The running-time bound
        joins the deadline here: LEAST keeps the earlier, so a retried job keeps its first one."""
        async with self.sessions() as session, session.begin():
            row = (await session.execute(claim_statement(Job.id == job_id, self.worker_id))).one_or_none()
        return None if row is None else Claim.of(row)

    async def expire(self, job_id: str) -> Any | None:
        """A job not claimed because its deadline passed before it started ends `expired` here; its row
        (prompt_tokens), or None when it was not that (or Postgres is away: the API's deadline duty
        ends it)."""
        try:
            async with self.sessions() as session, session.begin():
                return (await session.execute(expire_unstarted(job_id))).one_or_none()
        except DB_DOWN:
            return None

    async def cancel_flagged(self, job_id: str) -> bool:
        """Whether a cancel was asked before this worker claimed the job. The job's shard being away
        (restarting, failing over) does not stop the job from starting: a cancel asked now still comes
        as a message on the queue's Redis."""
        try:
            return bool(await self.events_redis.exists(keys.cancel_flag(job_id)))
        except RedisError as exc:
            log.warning("job %s: cannot read its cancel flag (%s); starting it", job_id, exc)
            return False

    async def published(self, job_id: str, n: int) -> Published:
        """What earlier attempts of a job published (this attempt continues it rather than start over,
        so that what clients already have stays true)."""
        try:
            events = await read_events(self.events_redis, job_id)
        except Exception as exc:
            log.warning("job %s: cannot read the text it had so far (%s); starting over", job_id, exc)
            return Published.nothing(n)
        indexes = [int(e.data.get("index", 0)) for e in events if e.event == "token"]
        texts = [text_of(events, i) for i in range(n)]
        if any(texts):
            chars = sum(len(t) for t in texts)
            log.info("job %s continues from the %d characters it had published", job_id, chars)
        return Published(texts, max(indexes, default=-1) + 1, [logprobs_of(events, i) for i in range(n)])

    async def write_final(self, job_id: str, attempt: int, status: JobStatus, values: dict[str, Any]) -> bool:
        """The one result write: only the attempt that still owns the running job may make it.
        While Postgres is unreachable it is retried with backoff, for as long as it takes."""
        stmt = move(status, Job.id == job_id, Job.attempts == attempt, src=JobStatus.RUNNING, **values)
        delay = 0.25
        while True:
            try:
                async with self.sessions() as session, session.begin():
                    result = await session.execute(stmt)
                return bool(getattr(result, "rowcount", 0))
            except DB_DOWN as exc:
                log.warning("result of job %s not written, Postgres unreachable (%s); retrying", job_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_BACKOFF_MAX_SECONDS)

    async def requeue(self, job_id: str, attempt: int) -> bool:
        """Running -> queued, for the attempt that still owns it; whether it was."""
        stmt = move(
            JobStatus.QUEUED, Job.id == job_id, Job.attempts == attempt, src=JobStatus.RUNNING, worker_id=None
        )
        async with self.sessions() as session, session.begin():
            result = await session.execute(stmt)
        return bool(getattr(result, "rowcount", 0))

    async def count_tokens(self, job_id: str, quota_key: str | None, tokens: int) -> None:
        """Add a job's tokens to its API key's daily quota counter (if the key has a quota)."""
        if not quota_key or not tokens:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incrby(quota_key, tokens)
                pipe.expire(quota_key, 2 * 86_400)
                await pipe.execute()
        except Exception as exc:
            log.warning("job %s: could not count %d tokens against its quota: %s", job_id, tokens, exc)

    async def queue_output_hook(self, job_id: str, tenant: str | None, url: str) -> None:
        params = {"job": job_id, "tenant": tenant or "default", "url": url}
        try:
            async with self.sessions() as session, session.begin():
                await session.execute(queue_output_delivery(), params)
        except Exception as exc:  # an output event is best effort: the completed one is the promise
            log.warning("job %s: output webhook not queued (%s)", job_id, exc)
