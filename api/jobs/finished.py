"""Reading the jobs that requests waited on, once they have ended: the reads of concurrent requests go
in one SELECT (shared/grouped.py), with the vectors of embedding jobs (deferred in other reads)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import undefer

from shared.models import Job


async def read_finished(sessions: async_sessionmaker[AsyncSession], job_ids: list[str]) -> list[Job | None]:
    """Each job of `job_ids` (None where there is none), in order, in one query."""
    async with sessions() as session:
        query = select(Job).where(Job.id.in_(set(job_ids))).options(undefer(Job.embedding))
        found = {job.id: job for job in (await session.execute(query)).scalars()}
    return [found.get(job_id) for job_id in job_ids]
