"""`GET /v1/jobs/{id}/events`: a job's events as Server-Sent Events, resumable with Last-Event-ID; and the
stream tokens that let a native EventSource (which sends no Authorization header) read them."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.http.deps import ServicesDep
from api.http.errors import (
    JOB_NOT_FOUND,
    STREAM_TOKEN_OPEN,
    STREAM_TOKEN_REVOKED,
    InvalidRequest,
    NotFound,
    Unauthorized,
)
from api.http.services import Services
from api.jobs.views import job_urls
from api.streams.sse import job_events as events_of
from api.streams.sse import load_job, sse_response
from api.streams.tokens import mint, verify
from api.tenancy.auth import ADMIN, ADMIN_TOKEN_SUBJECT, Principal, PrincipalDep, authenticate
from api.tenancy.ratelimit import limit_requests
from shared.browser import LAST_EVENT_ID, STREAM_TOKEN_PARAM, STREAM_TOKEN_PATH
from shared.events import Event, dumps

# Included without the app-wide key check (api/http/app.py): each route checks who asks itself.
router = APIRouter(prefix="/v1/jobs", tags=["events"])

MAX_EVENT_ID = 2**63 - 1  # event ids are Redis stream ids: 64-bit


class StreamToken(BaseModel):
    token: str = Field(description=f"Pass as `?{STREAM_TOKEN_PARAM}=` to this job's events route only.")
    expires_at: int = Field(description="Unix time after which it no longer opens (or reopens) the stream.")
    url: str = Field(description="The job's events URL with the token: what `new EventSource(url)` takes.")


async def stream_principal(
    job_id: str,
    request: Request,
    services: ServicesDep,
    token: Annotated[
        str | None,
        Query(
            alias=STREAM_TOKEN_PARAM,
            max_length=2048,
            description=f"A stream token (POST /v1/jobs/{{job_id}}/{STREAM_TOKEN_PATH}), for clients "
            "that cannot send an Authorization header, such as a browser's EventSource.",
        ),
    ] = None,
) -> Principal:
    """Who reads the stream: with a token (and auth on), that job's tenant, for that job only; else
    whoever the API key says. A token ends with the key that minted it (revoked: refused, within the
    key cache's time), and each stream it opens counts against that key's request limit, so that a
    reconnecting EventSource is limited like any other client."""
    if token is None or not await services.auth.required():
        return await authenticate(request, services)
    grant = await verify(services, token, job_id)
    if grant.key_id is None:  # minted while the API was open, which it no longer is
        raise Unauthorized(STREAM_TOKEN_OPEN, code="invalid_stream_token")
    if grant.key_id == ADMIN_TOKEN_SUBJECT:
        if not services.auth.has_admin_key:
            raise Unauthorized(STREAM_TOKEN_REVOKED, code="invalid_stream_token")
        return Principal(grant.tenant, admin=True)
    key = await services.auth.lookup(grant.key_id)
    if key is None or key.revoked:
        raise Unauthorized(STREAM_TOKEN_REVOKED, code="invalid_stream_token")
    await limit_requests(services, key.id, key.rate_per_minute, request)
    return Principal(grant.tenant, key.id, key.rate_per_minute, key.tokens_per_day)


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
    principal: Annotated[Principal, Depends(stream_principal)],
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="Resume after this event id.")
    ] = None,
    last_event_id: Annotated[str | None, Header(alias=LAST_EVENT_ID)] = None,
) -> EventSourceResponse:
    job = await load_job(services, job_id)
    if job is None or not principal.owns(job.tenant):
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    start = after or 0
    if last_event_id is not None and after is None:
        text = last_event_id.strip()
        if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) > MAX_EVENT_ID:
            raise InvalidRequest(
                f"{LAST_EVENT_ID} must be an event id (a non-negative integer)", param=LAST_EVENT_ID
            )
        start = int(text)
    return sse_response(_sse_stream(services, job_id, start), services)


@router.post(
    f"/{{job_id}}/{STREAM_TOKEN_PATH}",
    response_model=StreamToken,
    summary="Get a short-lived token that lets a native EventSource read this job's events",
    description="For browsers: `new EventSource(url)` cannot send an Authorization header, so it carries "
    "this job-scoped token instead (never the API key). It opens and reopens (Last-Event-ID) the job's "
    "stream until `expires_at`; a stream already open runs to its end.",
)
async def stream_token(job_id: str, services: ServicesDep, principal: PrincipalDep) -> StreamToken:
    job = await load_job(services, job_id)
    if job is None or not principal.owns(job.tenant):
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    minted_by = ADMIN_TOKEN_SUBJECT if principal is ADMIN else principal.key_id
    token, expires_at = await mint(services, job.id, job.tenant, minted_by)
    url = f"{job_urls(job.id).events}?{STREAM_TOKEN_PARAM}={quote(token)}"
    return StreamToken(token=token, expires_at=expires_at, url=url)
