"""Cancelling a job: a queued job never runs; a running one is stopped mid-generation by its worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import func, select

from api.http.errors import JOB_FINISHED, JOB_NOT_FOUND, Conflict, NotFound
from api.http.services import Services
from api.jobs.published import published
from api.tenancy.auth import OPEN, Principal
from shared import aio, keys
from shared.models import Job
from shared.states import TERMINAL, FinishReason, JobStatus
from shared.transitions import move

log = logging.getLogger(__name__)

CANCEL_WAIT_SECONDS = 5.0


async def cancel_job(services: Services, job_id: str, principal: Principal = OPEN) -> tuple[Job, bool]:
    """Returns the job and whether it has reached a final state."""
    async with services.sessions() as session, session.begin():
        job = (
            await session.execute(select(Job).where(Job.id == job_id).with_for_update())
        ).scalar_one_or_none()
        if job is None or not principal.owns(job.tenant):
            raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
        status = JobStatus(job.status)
        if status in TERMINAL:
            raise Conflict(JOB_FINISHED.format(job_id=job_id, status=status.value), param="id")
        if status is JobStatus.QUEUED:
            # One that ran before (its worker was lost) keeps the text it published then.
            kept = await published(
                services,
                job_id,
                request=dict(job.request),
                model=job.model,
                attempts=job.attempts,
                reason=FinishReason.CANCELLED,
            )
            # The row is locked: the move cannot miss.
            await session.execute(
                move(
                    JobStatus.CANCELLED,
                    Job.id == job_id,
                    src=JobStatus.QUEUED,
                    finished_at=func.clock_timestamp(),
                    **kept.values(),
                ).execution_options(synchronize_session=False)
            )
    if status is JobStatus.QUEUED:
        await _drop_from_queue(services, job_id, job.model)
        await services.events.publish(job_id, "done", kept.done(job.prompt_tokens))
        return await _reload(services, job_id), True
    return await _cancel_running(services, job_id)


async def _drop_from_queue(services: Services, job_id: str, model: str) -> None:
    # Postgres already says cancelled, so a worker that still dequeues it skips it; this just saves the trip.
    with contextlib.suppress(Exception):
        async with services.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(services.settings.queues.for_model(model), job_id)
            pipe.zrem(services.settings.queues.for_model(model, batch=True), job_id)
            pipe.delete(keys.ARQ_JOB_PREFIX + job_id)
            await pipe.execute()


async def signal_cancel(services: Services, job_ids: list[str]) -> None:
    """Tell whichever worker runs these jobs to stop them. The flag covers a worker that claims a job
    after the message went out."""
    # The flags are per job (on the job's shard of an events cluster); the message goes to every worker
    # over the queue's Redis, where they listen for enqueues too. Flags first: a worker that gets the
    # message stops the job at once, one that claims it later sees its flag.
    async with services.events_redis.pipeline(transaction=False) as flags:
        for job_id in job_ids:
            flags.set(keys.cancel_flag(job_id), "1", ex=services.settings.events.ttl_seconds)
        await flags.execute()
    async with services.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.publish(keys.CANCEL_CHANNEL, job_id)
        await pipe.execute()


async def _cancel_running(services: Services, job_id: str) -> tuple[Job, bool]:
    sub = await services.relay.subscribe(job_id)
    try:
        await signal_cancel(services, [job_id])
        deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_SECONDS
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                item = await aio.wait_for(sub.queue.get(), remaining)
            except TimeoutError:
                break
            if getattr(item, "is_end", False):
                break
    finally:
        await services.relay.unsubscribe(sub)
    job = await _reload(services, job_id)
    return job, JobStatus(job.status) in TERMINAL


async def _reload(services: Services, job_id: str) -> Job:
    async with services.sessions() as session:
        return (await session.execute(select(Job).where(Job.id == job_id))).scalar_one()
