"""Reconciliation (a duty): a job that Postgres says is queued but that Redis has lost (a Redis restart
without persistence, a crash between INSERT and enqueue) is enqueued again, at start-up and then
every `reconcile_seconds`. Batch jobs count only once the batch feeder has handed them to Redis."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, or_, select

from api.duties.reaper import ensure_enqueued, queue_of
from api.http.services import Services
from shared import keys
from shared.models import Batch, Job
from shared.states import JobStatus

log = logging.getLogger(__name__)

_CHUNK = 1000


class Reconciler:
    name = "reconcile"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.interval = services.settings.fleet.reconcile_seconds
        self.grace = timedelta(seconds=services.settings.fleet.reconcile_grace_seconds)
        self.requeued = 0

    async def tick(self) -> None:
        stmt = (
            select(Job.id, Job.model, Job.batch_id, Job.tenant)
            .outerjoin(Batch, Batch.id == Job.batch_id)
            .where(
                Job.status == JobStatus.QUEUED.value,
                Job.created_at < func.now() - self.grace,
                or_(Job.batch_id.is_(None), Job.batch_line <= Batch.fed),
            )
            .order_by(Job.created_at)
            .execution_options(yield_per=_CHUNK)
        )
        async with self.services.sessions() as session:
            result = await session.stream(stmt)
            async for chunk in result.partitions(_CHUNK):
                await self._check(list(chunk))

    async def _check(self, rows: list[tuple[str, str, str | None, str | None]]) -> None:
        async with self.services.redis.pipeline(transaction=False) as pipe:
            for job_id, *_ in rows:
                pipe.exists(keys.ARQ_JOB_PREFIX + job_id)
            present = await pipe.execute()
        for (job_id, model, batch_id, tenant), found in zip(rows, present, strict=True):
            if not found:
                queue = queue_of(self.services, model, batch_id)
                await ensure_enqueued(self.services, job_id, queue, tenant)
                self.requeued += 1
                log.warning("job %s was queued in Postgres but missing from Redis: enqueued again", job_id)
