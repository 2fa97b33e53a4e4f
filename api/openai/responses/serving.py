"""The Responses API over jobs: create (foreground or background, streamed or not), retrieve and
resume, cancel, delete, list input items. Each response is one job; this module only shapes it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import ValidationError

from api.duties.retention import remove
from api.http.errors import ApiError, Conflict, InvalidRequest, NotFound, describe_validation
from api.http.services import Services
from api.jobs.cancellation import cancel_job
from api.jobs.submission import submit_job
from api.openai.responses import render as view
from api.openai.responses.calls import events_for
from api.openai.responses.events import after, finished, last_number
from api.openai.responses.protocol import ResponseCreateRequest, as_chat, format_param, input_items
from api.openai.serving import cancel_quietly
from api.streams.sse import job_events, load_job
from api.tenancy.auth import Principal
from shared import logs
from shared import responses as wire
from shared.events import read_events
from shared.models import Job
from shared.schemas import JobCreateRequest
from shared.states import TERMINAL, JobStatus
from shared.tool_parsers import chat_tool_calls, parsed_answer

RESPONSE_NOT_FOUND = "no response with id '{id}'"
STILL_STOPPING = "response '{id}' is still stopping after its cancel; delete it again in a moment"
PREVIOUS_UNFINISHED = "previous response '{id}' is still {status}; continue from it once it has finished"
STARTING_AFTER_PAST_END = "starting_after {n} is past the last event of response '{id}' ({last})"


async def find(services: Services, principal: Principal, response_id: str, param: str | None = None) -> Job:
    """The job behind a stored response of this tenant; 404 for anything else, another tenant's included."""
    job_id = wire.job_id(response_id)
    job = await load_job(services, job_id) if job_id is not None else None
    if (
        job is None
        or not principal.owns(job.tenant)
        or not view.is_response(job)
        or not view.attrs(job).get("store", True)
        or job.data_removed_at is not None
    ):
        raise NotFound(RESPONSE_NOT_FOUND.format(id=response_id), param=param)
    return job


def _conversation(job: Job) -> list[dict[str, Any]]:
    """An earlier response's messages (less its instructions, which do not carry over) and its answer:
    its text, or its content and the calls it made (named by their call_id)."""
    messages: list[dict[str, Any]] = list(job.request.get("messages") or [])
    if view.attrs(job).get("instructions") is not None:
        messages = messages[1:]
    parsed = parsed_answer(job.request, job.output)
    if parsed is not None and parsed.calls:
        calls = chat_tool_calls(job.id, parsed.calls)
        messages.append({"role": "assistant", "content": parsed.content or "", "tool_calls": calls})
    elif job.output:
        messages.append({"role": "assistant", "content": job.output})
    return messages


async def response_job(
    services: Services, body: ResponseCreateRequest, principal: Principal
) -> tuple[JobCreateRequest, dict[str, Any]]:
    """The job request of a Responses request, and what the Response keeps with the job for itself."""
    body.check()
    items = input_items(body.input)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await find(services, principal, body.previous_response_id, "previous_response_id")
        if JobStatus(previous.status) not in TERMINAL:
            state = view.status(previous)
            raise InvalidRequest(
                PREVIOUS_UNFINISHED.format(id=body.previous_response_id, status=state),
                param="previous_response_id",
            )
        history = _conversation(previous)
    system = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": system + history + as_chat(items),
        "max_tokens": body.max_output_tokens,
        "metadata": body.metadata,
    }
    for name in ("temperature", "top_p"):
        if getattr(body, name) is not None:
            fields[name] = getattr(body, name)
    text_format = body.text.format if body.text is not None else None
    if text_format is not None:
        fields["response_format"] = text_format.response_format()
    fields.update(body.chat_tools())
    try:
        req = JobCreateRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        message, param = describe_validation(exc.errors())
        raise InvalidRequest(message, param=format_param(param)) from None
    attrs = {
        "background": bool(body.background),
        "store": body.store is not False,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "max_output_tokens": body.max_output_tokens,
        "user": body.user,
        "input": items,
        **body.echoed,
    }
    if text_format is not None and text_format.type != "text":
        attrs["text_format"] = text_format.model_dump(exclude_none=True)  # echoed as given
    return req, attrs


@contextlib.contextmanager
def format_params() -> Iterator[None]:
    """A field the job's checks refuse (a schema the grammar cannot enforce, a tool's parameters, the
    prompt's length) is named as a Responses request spells it."""
    try:
        yield
    except InvalidRequest as exc:
        exc.param = format_param(exc.param)
        raise


async def submit_response(
    services: Services, body: ResponseCreateRequest, principal: Principal, cancel_after: float | None = None
) -> Job:
    req, attrs = await response_job(services, body, principal)
    with format_params():
        return await submit_job(
            services,
            req,
            principal,
            endpoint=wire.ENDPOINT,
            request_id=logs.request_id.get(),
            extra={"response": attrs},
            cancel_after=cancel_after,
        )


def _sse(event: dict[str, Any]) -> dict[str, str]:
    return {
        "event": event["type"],
        "id": str(event["sequence_number"]),
        "data": json.dumps(event, separators=(",", ":"), ensure_ascii=False),
    }


async def check_starting_after(services: Services, job: Job, starting_after: int | None) -> None:
    """400 for a resume point past the last event the response has had so far."""
    if starting_after is None:
        return
    if JobStatus(job.status) in TERMINAL:
        last = last_number(job)
    else:
        derive = events_for(job)
        numbers = [e["sequence_number"] for e in derive.opening()]
        for event in await read_events(services.events_redis, job.id):
            numbers += [e["sequence_number"] for e in derive.feed(event)]
        last = max(numbers)
    if starting_after > last:
        raise InvalidRequest(
            STARTING_AFTER_PAST_END.format(n=starting_after, id=wire.response_id(job.id), last=last),
            param="starting_after",
        )


async def stream_response(
    services: Services, job: Job, starting_after: int | None = None, *, cancel_on_leave: bool = False
) -> AsyncIterator[dict[str, str]]:
    """The response's stream events after `starting_after`, as SSE messages, until its last event."""
    if JobStatus(job.status) in TERMINAL:
        for event in after(
            finished(events_for(job), await read_events(services.events_redis, job.id)), starting_after
        ):
            yield _sse(event)
        return
    derive = events_for(job)
    ended = False
    try:
        for event in after(derive.opening(), starting_after):
            yield _sse(event)
        async for job_event in job_events(services, job.id):
            if job_event.is_end:
                final = await load_job(services, job.id)
                ended = True
                if final is not None:  # None: deleted meanwhile
                    for event in after(derive.closing(final), starting_after):
                        yield _sse(event)
                return
            for event in after(derive.feed(job_event), starting_after):
                yield _sse(event)
        ended = True  # the job's row went away: nothing more will come
    finally:
        if not ended and cancel_on_leave and services.settings.cancel_on_disconnect:
            services.spawn(cancel_quietly(services, job.id))


async def cancel_response(services: Services, principal: Principal, response_id: str) -> dict[str, Any]:
    """Cancel a queued or running response; a finished one is returned as it is."""
    job = await find(services, principal, response_id)
    if JobStatus(job.status) not in TERMINAL:
        with contextlib.suppress(ApiError):  # finished meanwhile: returned as it is
            job, _ = await cancel_job(services, job.id, principal)
        job = await find(services, principal, response_id)
    return view.render(job)


async def delete_response(services: Services, principal: Principal, response_id: str) -> dict[str, Any]:
    """Remove a response: its input, output and events go (a running one is cancelled first); its job
    stays as a tombstone with its usage, and every Responses route answers 404 for it."""
    job = await find(services, principal, response_id)
    if JobStatus(job.status) not in TERMINAL:
        with contextlib.suppress(ApiError):
            await cancel_job(services, job.id, principal)
    if not await remove(services, [job.id]):
        raise Conflict(STILL_STOPPING.format(id=response_id), param="response_id")
    return {"id": response_id, "object": "response", "deleted": True}


def list_input_items(job: Job, *, limit: int, order: str, after_id: str | None) -> dict[str, Any]:
    items = [view.input_item(job, i, item) for i, item in enumerate(view.attrs(job).get("input") or [])]
    if order == "desc":
        items.reverse()
    if after_id is not None:
        ids = [item["id"] for item in items]
        if after_id not in ids:
            raise InvalidRequest(f"no input item '{after_id}' in this response", param="after")
        items = items[ids.index(after_id) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else "",
        "last_id": page[-1]["id"] if page else "",
        "has_more": len(items) > limit,
    }
