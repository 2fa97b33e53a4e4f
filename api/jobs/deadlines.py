"""Deadlines on the API side: the `Cancel-After` header of the submit routes, and the duty that ends
queued jobs whose deadline passed (one API process at a time, every reaper interval).

A queued job that never started ends `expired`. One that had run (its worker was lost or drained and
it waits for another) ends `cancelled` with finish_reason `timeout` and the text it had published, as
it would have had its worker stopped it. The worker enforces the same deadline while the job runs.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, Header
from sqlalchemy import func, select

from api.duties.reaper import queue_of
from api.http.errors import InvalidRequest
from api.http.services import Services
from api.jobs.enqueue import forget
from api.jobs.published import end_waiting_retry
from shared import headers
from shared.deadlines import BAD_DURATION, ended, expire_unstarted, parse_duration
from shared.models import Job
from shared.states import FinishReason, JobStatus

log = logging.getLogger(__name__)

_BATCH = 200  # jobs ended per tick at most: a burst of expiries never holds the duty for long


def _cancel_after(
    value: Annotated[
        str | None,
        Header(
            alias=headers.CANCEL_AFTER,
            description="A deadline from now: '30s', '5m', '1h30m', '250ms' or seconds. Not started by "
            "then: the job ends `expired`; running: it is stopped with its output so far.",
        ),
    ] = None,
) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise InvalidRequest(f"{headers.CANCEL_AFTER} {BAD_DURATION}", param=headers.CANCEL_AFTER) from None


CancelAfterDep = Annotated[float | None, Depends(_cancel_after)]


class Deadlines:
    name = "deadlines"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.interval = services.settings.fleet.reaper_seconds

    async def tick(self) -> None:
        async with self.services.sessions() as session:
            rows = (
                await session.execute(
                    select(Job.id, Job.attempts, Job.model, Job.batch_id, Job.prompt_tokens, Job.request)
                    .where(Job.status == JobStatus.QUEUED.value, Job.deadline_at <= func.clock_timestamp())
                    .order_by(Job.deadline_at)
                    .limit(_BATCH)
                )
            ).all()
        for row in rows:
            if row.attempts == 0:
                await self._expire(row.id)
            else:
                await self._stop_retried(row)

    async def _expire(self, job_id: str) -> None:
        async with self.services.sessions() as session, session.begin():
            row = (await session.execute(expire_unstarted(job_id))).one_or_none()
        if row is None:
            return  # a worker took it meanwhile: the worker enforces its deadline now
        log.info("job %s expired: its deadline passed before it started", job_id)
        await forget(self.services.redis, job_id, queue_of(self.services, row.model, row.batch_id))
        await self.services.events.publish(job_id, "done", ended(row.prompt_tokens, 0, JobStatus.EXPIRED))

    async def _stop_retried(self, row: Any) -> None:
        queue = queue_of(self.services, row.model, row.batch_id)
        if await end_waiting_retry(self.services, row, FinishReason.TIMEOUT, queue):
            log.info("job %s reached its deadline while waiting to be retried; stopped", row.id)
