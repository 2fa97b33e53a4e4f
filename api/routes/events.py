"""`GET /v1/jobs/{id}/events`: a job's events as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import ServicesDep
from api.errors import JOB_NOT_FOUND, InvalidRequest, NotFound
from api.services import Services
from api.streams import job_events as events_of
from api.streams import load_job
from shared.events import Event, dumps

router = APIRouter(prefix="/v1/jobs", tags=["events"])


def _sse(event: Event) -> ServerSentEvent:
    return ServerSentEvent(data=dumps(event.data), event=event.event, id=str(event.seq))


async def _sse_stream(services: Services, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    async for event in events_of(services, job_id, after):
        yield _sse(event)


@router.get(
    "/{job_id}/events",
    summary="Stream a job's events (SSE)",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "status, token, done, error events"}
    },
)
async def job_events(
    job_id: str,
    services: ServicesDep,
    after: Annotated[int | None, Query(ge=0, description="Resume after this event id.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    if await load_job(services, job_id) is None:
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    start = after or 0
    if last_event_id is not None and after is None:
        if not last_event_id.strip().isdigit():
            raise InvalidRequest(
                "Last-Event-ID must be an event id (a non-negative integer)", param="Last-Event-ID"
            )
        start = int(last_event_id)
    return EventSourceResponse(
        _sse_stream(services, job_id, start),
        ping=int(services.settings.events.ping_seconds),
        headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
    )
