"""`GET /v1/jobs/{id}/events`: a job's events as Server-Sent Events, resumable with Last-Event-ID."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import PrincipalDep
from api.deps import ServicesDep
from api.errors import JOB_NOT_FOUND, InvalidRequest, NotFound
from api.services import Services
from api.streams import job_events as events_of
from api.streams import load_job, sse_response
from shared.events import Event, dumps

router = APIRouter(prefix="/v1/jobs", tags=["events"])

MAX_EVENT_ID = 2**63 - 1  # event ids are Redis stream ids: 64-bit


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
    principal: PrincipalDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="Resume after this event id.")
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    job = await load_job(services, job_id)
    if job is None or not principal.owns(job.tenant):
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    start = after or 0
    if last_event_id is not None and after is None:
        text = last_event_id.strip()
        if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) > MAX_EVENT_ID:
            raise InvalidRequest(
                "Last-Event-ID must be an event id (a non-negative integer)", param="Last-Event-ID"
            )
        start = int(text)
    return sse_response(_sse_stream(services, job_id, start), services)
