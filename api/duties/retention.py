"""Removing what a job said while keeping what it cost: `DELETE /v1/jobs/{id}`, and the optional
retention period (a duty, off by default). A removed job keeps its row as a tombstone (status, usage,
timings, attempts, model) and loses its prompt, output (an embeddings job's vectors too), metadata,
error message, Redis events and the bodies of its webhook deliveries. Rows are cleared in bounded
statements, so no lock is held long."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import bindparam, text, update

from api.http.services import Services
from shared import keys
from shared.models import WebhookDelivery
from shared.states import TERMINAL

log = logging.getLogger(__name__)

# What of the request stays: what the job ran as, not what it was asked.
_TOMBSTONE = """
    request = jsonb_strip_nulls(jsonb_build_object(
        'model', request -> 'model', 'endpoint', request -> 'endpoint', 'max_tokens', request -> 'max_tokens'
    )),
    output = NULL, logprobs = NULL, choices = NULL, embedding = NULL, metadata = NULL, error_message = NULL,
    data_removed_at = now()
"""
# Only a finished job's content goes: its status does not change (states.TERMINAL have no moves).
_FINISHED = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))
_REMOVE = text(
    f"UPDATE jobs SET {_TOMBSTONE} WHERE id IN :ids AND data_removed_at IS NULL "
    f"AND status IN ({_FINISHED}) RETURNING id"
).bindparams(bindparam("ids", expanding=True))
_EXPIRED = text(
    f"""
    UPDATE jobs SET {_TOMBSTONE}
    WHERE id IN (
        SELECT id FROM jobs
        WHERE data_removed_at IS NULL AND finished_at < now() - make_interval(secs => :age)
        ORDER BY finished_at
        LIMIT :n
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
    """
)


async def _forget(services: Services, ids: Sequence[str]) -> None:
    """The rest of the removed jobs' content: Redis events and webhook bodies."""
    if not ids:
        return
    async with services.sessions() as session, session.begin():
        await session.execute(
            update(WebhookDelivery).where(WebhookDelivery.subject_id.in_(ids)).values(body=None)
        )
    async with services.events_redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.delete(keys.events_stream(job_id), keys.cancel_flag(job_id))
        await pipe.execute()


async def remove(services: Services, ids: Sequence[str]) -> list[str]:
    """Clear these finished jobs (unfinished ones are left alone); the ids cleared now."""
    async with services.sessions() as session, session.begin():
        removed = list((await session.execute(_REMOVE, {"ids": list(ids)})).scalars())
    await _forget(services, removed)
    return removed


class Retention:
    """Clears jobs that finished more than `retention.seconds` ago, `retention.batch` at a time."""

    name = "retention"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings.retention
        self.interval = self.settings.tick_seconds

    async def tick(self) -> None:
        if self.settings.seconds is None:
            return
        for _ in range(20):  # at most this many statements a tick, each a short transaction
            async with self.services.sessions() as session, session.begin():
                params = {"age": self.settings.seconds, "n": self.settings.batch}
                removed = list((await session.execute(_EXPIRED, params)).scalars())
            await _forget(self.services, removed)
            if removed:
                log.info("retention: removed the content of %d finished jobs", len(removed))
            if len(removed) < self.settings.batch:
                return
