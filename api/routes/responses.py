"""OpenAI's Responses API: `/v1/responses` (create, retrieve or resume, cancel, delete, input items).

Background responses are durable: any API process serves any response's state or stream, after
restarts too, since the job's Postgres row and Redis events are the whole of it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from api.http.deps import ServicesDep
from api.http.errors import NotFound
from api.http.services import Services
from api.jobs.deadlines import CancelAfterDep
from api.openai.responses import render as view
from api.openai.responses.protocol import ResponseCreateRequest
from api.openai.responses.serving import (
    RESPONSE_NOT_FOUND,
    cancel_response,
    check_starting_after,
    delete_response,
    find,
    list_input_items,
    stream_response,
    submit_response,
)
from api.openai.serving import ClientGone, create_once, wait_for_job
from api.streams.sse import load_job, sse_response
from api.tenancy.auth import PrincipalDep, QuotaDep
from api.tenancy.idempotency import Outcome
from shared.headers import JOB_ID
from shared.models import Job

router = APIRouter(prefix="/v1/responses", tags=["openai"])

MAX_SEQUENCE = 2**53  # sequence numbers count characters: far below this
_RESPONSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}, "text/event-stream": {}},
        "description": "The Response object (OpenAI's shape), or its stream events when `stream`.",
    }
}
_JSON_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}}, "description": "OpenAI's shape."}
}


def _stream(
    services: Services, job: Job, starting_after: int | None, headers: dict[str, str], *, foreground: bool
) -> EventSourceResponse:
    return sse_response(
        stream_response(services, job, starting_after, cancel_on_leave=foreground), services, headers
    )


@router.post(
    "",
    response_class=JSONResponse,
    responses=_RESPONSE_DOC,
    summary="Create a response (OpenAI Responses API)",
)
async def create_response(
    body: Annotated[ResponseCreateRequest, Body()],
    services: ServicesDep,
    request: Request,
    principal: PrincipalDep,
    _quota: QuotaDep,
    cancel_after: CancelAfterDep,
) -> Response:
    async def create() -> Outcome:
        job = await submit_response(services, body, principal, cancel_after)
        if body.stream:
            return Outcome(200, None, job.id)  # the answer is the stream; a replay streams it again
        if body.background:
            return Outcome(200, view.render(job), job.id)
        finished = await wait_for_job(services, job, request)
        if finished is None:
            raise ClientGone
        return Outcome(200, view.render(finished), job.id)

    created = await create_once(services, principal, request, create)
    if isinstance(created, Response):
        return created
    outcome, headers = created
    if body.stream:
        job = await load_job(services, headers[JOB_ID])
        if job is None:  # deleted since
            raise NotFound(RESPONSE_NOT_FOUND.format(id=outcome.job_id))
        return _stream(services, job, None, headers, foreground=not body.background)
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


def _resume_point(starting_after: int | None, last_event_id: str | None) -> int | None:
    if starting_after is not None or last_event_id is None:
        return starting_after
    return int(last_event_id)  # a browser's EventSource reconnecting


@router.get(
    "/{response_id}",
    response_class=JSONResponse,
    responses=_RESPONSE_DOC,
    summary="Get a response, or stream it again from `starting_after`",
)
async def retrieve_response(
    response_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    stream: Annotated[bool, Query(description="Stream the response's events (SSE).")] = False,
    starting_after: Annotated[
        int | None,
        Query(
            ge=0, le=MAX_SEQUENCE, description="With `stream`: only the events after this sequence_number."
        ),
    ] = None,
    include: Annotated[list[str] | None, Query(max_length=0, description="Not supported: leave out.")] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", pattern=r"^[0-9]{1,15}$", description="As `starting_after`."),
    ] = None,
) -> Response:
    job = await find(services, principal, response_id)
    if not stream:
        return JSONResponse(view.render(job), headers={JOB_ID: job.id})
    start = _resume_point(starting_after, last_event_id)
    await check_starting_after(services, job, start)
    return _stream(services, job, start, {JOB_ID: job.id}, foreground=False)


@router.post(
    "/{response_id}/cancel",
    response_class=JSONResponse,
    responses=_JSON_DOC,
    summary="Cancel a queued or in-progress response",
)
async def cancel(response_id: str, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(await cancel_response(services, principal, response_id))


@router.delete(
    "/{response_id}", response_class=JSONResponse, responses=_JSON_DOC, summary="Delete a response"
)
async def delete(response_id: str, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(await delete_response(services, principal, response_id))


@router.get(
    "/{response_id}/input_items",
    response_class=JSONResponse,
    responses=_JSON_DOC,
    summary="List a response's input items",
)
async def input_items(
    response_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[
        str | None, Query(max_length=100, description="Id of the last item of the previous page.")
    ] = None,
    include: Annotated[list[str] | None, Query(max_length=0, description="Not supported: leave out.")] = None,
) -> JSONResponse:
    job = await find(services, principal, response_id)
    return JSONResponse(list_input_items(job, limit=limit, order=order, after_id=after))
