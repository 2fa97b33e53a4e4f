"""A job's events, in order and without gaps, for every consumer: the SSE route, the OpenAI routes.

Order of work: subscribe to the live channel (confirmed), then read the backlog from the job's
event stream, then relay live events, dropping every seq already sent. A gap in seqs, a relay
reconnect, or a quiet spell re-reads the stream; if the stream is gone (expired) the job's final
record in Postgres is replayed instead, so a finished job always replays and ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.http.services import Services
from api.streams.relay import RESYNC
from shared import aio
from shared.events import CHOICE, CHOICES, Event, last_event, read_events
from shared.logprobs import LOGPROBS
from shared.models import Job
from shared.states import TERMINAL, JobStatus

log = logging.getLogger(__name__)

QUIET_RECHECK_SECONDS = 5.0


async def load_job(services: Services, job_id: str) -> Job | None:
    # A fresh session each time: a stream outlives any request-scoped session.
    async with services.sessions() as session:
        return (await session.execute(select(Job).where(Job.id == job_id))).scalar_one_or_none()


def from_record(job: Job, after: int) -> list[Event]:
    """The history of a finished job whose Redis events have expired, rebuilt from Postgres."""
    usage = {
        "prompt_tokens": job.prompt_tokens or 0,
        "completion_tokens": job.completion_tokens or 0,
        "total_tokens": (job.prompt_tokens or 0) + (job.completion_tokens or 0),
    }
    timings = {
        "queue_ms": job.queue_ms,
        "ttft_ms": job.ttft_ms,
        "total_ms": job.total_ms,
        "tokens_per_s": job.tokens_per_s,
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("status", {"status": job.status, "worker_id": job.worker_id})
    ]
    # Each output's text as one token event, marked with its output as the live ones are.
    outputs = job.choices or [{"index": 0, "text": job.output, "logprobs": job.logprobs}]
    for output in outputs:
        if output.get("text"):
            token: dict[str, Any] = {"index": len(events) - 1, "text": output["text"]}
            if job.choices:
                token[CHOICE] = output["index"]
            if output.get(LOGPROBS) is not None:
                token[LOGPROBS] = output[LOGPROBS]
            events.append(("token", token))
    if job.status == JobStatus.FAILED.value:
        events.append(("error", {"type": job.error_type or "error", "message": job.error_message or ""}))
    else:
        done: dict[str, Any] = {"finish_reason": job.finish_reason, "usage": usage, "timings": timings}
        if job.choices:
            done[CHOICES] = [{"index": c["index"], "finish_reason": c["finish_reason"]} for c in job.choices]
        events.append(("done", done))
    history = [Event(seq, event, data) for seq, (event, data) in enumerate(events, start=1)]
    return [e for e in history if e.seq > after]


async def _resync(services: Services, job_id: str, last: int) -> list[Event] | None:
    """The events after `last` from the job's stream, or its end from its record when the stream has
    none (events expired or lost); None once the job's row is gone."""
    pending = await read_events(services.events_redis, job_id, after=last)
    if pending:
        return pending
    job = await load_job(services, job_id)
    if job is None:
        return None
    if JobStatus(job.status) in TERMINAL:
        return [Event(last + 1, e.event, e.data) for e in from_record(job, 0) if e.is_end]
    return []


async def _first(services: Services, job_id: str, after: int, fresh: bool) -> list[Event] | None:
    """What a stream starting after `after` sends first; None when the client has every event."""
    pending = await read_events(services.events_redis, job_id, after=after)
    if pending or fresh:
        return pending
    if after == 0:
        job = await load_job(services, job_id)
        if job is not None and JobStatus(job.status) in TERMINAL:
            return from_record(job, after)
        return []
    # A client that has every event, the end included (a browser's EventSource reconnects after
    # `done` unless closed): nothing more, at once, rather than the end again a while later.
    newest = await last_event(services.events_redis, job_id)
    return None if newest is not None and newest.is_end and newest.seq <= after else []


async def job_events(
    services: Services, job_id: str, after: int = 0, *, fresh: bool = False
) -> AsyncIterator[Event]:
    """Every event of a job after seq `after`, in order, ending with its `done` or `error` (or with
    nothing more, once the job's row has been deleted). `fresh`: a job this request has just created,
    whose events cannot have expired yet, so no Postgres read for an ended job without events (a Redis
    that lost them is still found out by the quiet-spell recheck)."""
    sub = await services.relay.subscribe(job_id)
    last = after
    try:

        async def backlog() -> list[Event]:
            return await read_events(services.events_redis, job_id, after=last)

        pending = await _first(services, job_id, last, fresh)
        if pending is None:
            return
        while True:
            for event in pending:
                if event.seq <= last:
                    continue
                last = event.seq
                yield event
                if event.is_end:
                    return
            pending = []
            try:
                item: Any = await aio.wait_for(sub.queue.get(), QUIET_RECHECK_SECONDS)
            except TimeoutError:
                item = RESYNC
            try:
                if item is RESYNC:
                    resynced = await _resync(services, job_id, last)
                    if resynced is None:
                        return  # deleted: nothing more will come
                    pending = resynced
                elif isinstance(item, Event):
                    pending = await backlog() if item.seq > last + 1 else [item]
            except RedisError as exc:
                # The job's shard is away (restarting, failing over): the stream stays open and reads
                # again once the relay has its subscription back (RESYNC), or after a quiet spell.
                log.info("job %s: reading its events failed (%s); reading again shortly", job_id, exc)
                pending = []
    finally:
        await services.relay.unsubscribe(sub)


async def until_end(services: Services, job_id: str, *, fresh: bool = False) -> None:
    """Return once the job has ended (its `done` or `error` event), following its live events."""
    async for event in job_events(services, job_id, fresh=fresh):
        if event.is_end:
            return


SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


class _Keepalive(ServerSentEvent):
    """A ping that is one comment line and no blank line after it. A blank line would end an empty
    event, and the openai SDK's decoder dispatches one once an earlier event had an `id` (it keeps
    last_event_id, as the spec asks) and then fails to parse its empty data as JSON (openai-python
    #2722): a Responses stream through it broke at its first ping. Every SSE parser skips the line."""

    def encode(self) -> bytes:
        return b": ping\r\n"


def sse_response(
    content: AsyncIterator[Any], services: Services, headers: dict[str, str] | None = None
) -> EventSourceResponse:
    """The SSE response of every streaming route: no proxy buffering, a ping every ping_seconds."""
    return EventSourceResponse(
        content,
        ping=int(services.settings.events.ping_seconds),
        ping_message_factory=_Keepalive,
        headers={**(headers or {}), **SSE_HEADERS},
    )
