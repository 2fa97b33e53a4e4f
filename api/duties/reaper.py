"""Reclaiming the jobs of dead workers (a duty: one API process at a time, every second).

A worker is dead when its registry key has expired (it missed `dead_after_missed` heartbeats) and
stays gone for one more tick. Each of its running jobs is, depending on the job: cancelled (a cancel
was asked while its worker was dying), failed with `worker_lost` (it has used its `max_attempts`), or
handed back to the queue with a `status` event (the next attempt continues from the text published).
arq's in-progress lock of the job is removed, so another worker takes it at its next poll instead of
after arq's job timeout. Every change is guarded by the attempt number, so a slow worker that is in
fact alive can never overwrite what the reaper decided, nor the reverse.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from api.http.services import Services
from api.jobs.enqueue import enqueue, forget
from api.jobs.published import Published, published
from shared import keys
from shared.fleet import live_workers
from shared.models import Job
from shared.states import FinishReason, JobStatus
from shared.transitions import move

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"
WORKER_LOST_MESSAGE = "the worker running this job was lost on each of its {n} attempts"


def queue_of(services: Services, model: str, batch_id: str | None) -> str:
    return services.settings.queues.for_model(model, batch=batch_id is not None)


async def ensure_enqueued(
    services: Services, job_id: str, queue: str, tenant: str | None, in_line_since: datetime | None = None
) -> None:
    """Make the job takeable from `queue` now: no in-progress lock, an arq job record, a queue entry.
    With `in_line_since` (a reclaimed job's creation), the job takes its old place in the queue (arq
    takes the lowest score first) instead of joining its end: it was admitted then, and has waited."""
    redis = services.redis
    await redis.delete(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
    enqueued = await enqueue(redis, queue, job_id, tenant)
    score = int((in_line_since.timestamp() if in_line_since else time.time()) * 1000)
    if in_line_since is not None or not enqueued:
        # Back in the queue if it left it; never later than where it stands (LT also adds a missing one).
        await redis.zadd(queue, {job_id: score}, lt=True)
    if not enqueued or in_line_since is not None:
        await redis.publish(keys.wake_channel(queue), "1")  # takeable again: workers need not wait to poll


class Reaper:
    name = "reaper"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.interval = services.settings.fleet.reaper_seconds
        self.max_attempts = services.settings.worker.max_attempts
        # A missing registry key must stay missing this long: after a Redis restart, live workers need
        # a beat to write theirs again.
        self.grace = max(2.0, 2 * self.interval)
        self._missing_since: dict[str, float] = {}
        self._unindexed: set[str] = set()  # live workers missing from the registry's index (warned of)

    async def tick(self) -> None:
        try:
            live = {str(w.get("id")) for w in await live_workers(self.services.redis)}
            async with self.services.sessions() as session:
                rows = (
                    await session.execute(
                        select(
                            Job.id,
                            Job.worker_id,
                            Job.attempts,
                            Job.model,
                            Job.batch_id,
                            Job.prompt_tokens,
                            Job.tenant,
                            Job.created_at,
                            Job.request,
                        ).where(Job.status == JobStatus.RUNNING.value)
                    )
                ).all()
        except Exception:
            self._missing_since.clear()  # no trustworthy view of the fleet this time
            raise
        now = time.monotonic()
        absent = {r.worker_id for r in rows if r.worker_id not in live}
        if absent:
            absent -= await self._beating_unindexed(absent)
        self._missing_since = {w: self._missing_since.get(w, now) for w in absent}
        dead = {w for w, since in self._missing_since.items() if now - since >= self.grace}
        for row in rows:
            if row.worker_id in dead:
                await self.reclaim(row)

    async def _beating_unindexed(self, absent: set[str]) -> set[str]:
        """Of the workers that hold running jobs but are missing from the registry's index, those whose
        entry is alive: a worker older than the index writes only its entry (a rolling upgrade), and
        its jobs stay its own while it beats. It is not listed anywhere else, so say so, once."""
        named = [w for w in absent if w]
        beating = {str(w.get("id")) for w in await live_workers(self.services.redis, also=named)} & absent
        for worker_id in beating - self._unindexed:
            log.warning(
                "worker %s beats but is missing from the registry's index (an older inferq?): it is not "
                "listed in /v1/workers or /metrics until it is upgraded",
                worker_id,
            )
        self._unindexed = beating
        return beating

    async def reclaim(self, row: Any) -> None:
        services = self.services
        queue = queue_of(services, row.model, row.batch_id)
        guard = (Job.id == row.id, Job.attempts == row.attempts)
        cancel_asked = bool(await services.events_redis.exists(keys.cancel_flag(row.id)))
        kept: Published | None = None
        if cancel_asked:
            # Stopped as its worker would have stopped it: with the text it had published.
            status = JobStatus.CANCELLED
            kept = await published(
                services,
                row.id,
                request=dict(row.request),
                model=row.model,
                attempts=row.attempts,
                reason=FinishReason.CANCELLED,
            )
            values: dict[str, Any] = {**kept.values(), "finished_at": func.clock_timestamp()}
        elif row.attempts >= self.max_attempts:
            status = JobStatus.FAILED
            values = {
                "error_type": WORKER_LOST,
                "error_message": WORKER_LOST_MESSAGE.format(n=row.attempts),
                "finished_at": func.clock_timestamp(),
            }
        else:
            status = JobStatus.QUEUED
            values = {"worker_id": None}
        async with services.sessions() as session, session.begin():
            result = await session.execute(move(status, *guard, src=JobStatus.RUNNING, **values))
        if not getattr(result, "rowcount", 0):
            return  # the job moved on meanwhile (it finished, or was reclaimed already)
        log.warning(
            "job %s: worker %s is dead; job %s (attempt %d)",
            row.id,
            row.worker_id,
            status.value,
            row.attempts,
        )
        if status is JobStatus.QUEUED:
            await services.events.publish(
                row.id,
                "status",
                {
                    "status": "queued",
                    "reason": WORKER_LOST,
                    "worker_id": row.worker_id,
                    "attempt": row.attempts,
                },
                attempt=row.attempts + 1,  # the lost attempt's late events are dropped from now on
            )
            await ensure_enqueued(services, row.id, queue, row.tenant, in_line_since=row.created_at)
            return
        await forget(services.redis, row.id, queue)
        if kept is not None:
            await services.events.publish(row.id, "done", kept.done(row.prompt_tokens))
        else:
            await services.events.publish(
                row.id, "error", {"type": WORKER_LOST, "message": values["error_message"]}
            )
