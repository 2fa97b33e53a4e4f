"""Running an OpenAI request as an inferq job: submit it, then wait for it or stream its tokens as chunks.

Every OpenAI request is an ordinary job (same queue, workers, events and Postgres row); only the
shape of the answer differs. Once a stream has sent 200, a failure travels as a `data: {"error"}`
chunk (as OpenAI and vLLM do) and the stream still ends with `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from api.http.errors import ApiError, InvalidRequest, describe_validation
from api.http.services import Services
from api.jobs.cancellation import cancel_job
from api.jobs.submission import submit_job
from api.openai.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from api.streams.sse import job_events, load_job, until_end
from api.tenancy.auth import Principal
from api.tenancy.idempotency import REPLAYED_HEADER, Outcome, run_idempotent
from shared import logs
from shared.events import CHOICES, Event, choice_of, text_after
from shared.headers import JOB_ID
from shared.logprobs import LOGPROBS, completion_logprobs
from shared.models import Job
from shared.schemas import Usage
from shared.states import FinishReason, JobStatus
from shared.tool_parsers import CallDelta, CallStream, call_id, chat_tool_calls, parsed_answer
from shared.tools import calls_allowed

log = logging.getLogger(__name__)

Kind = Literal["chat", "completion"]
ENDPOINTS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
JOB_CANCELLED = "job '{job_id}' was cancelled before it finished"
JOB_TIMED_OUT = "job '{job_id}' reached its deadline (Cancel-After or timeout_seconds) before it finished"
JOB_FAILED = "job '{job_id}' failed: {message}"


class JobFailed(ApiError):
    status_code = 500
    type = "server_error"


class JobCancelled(ApiError):
    status_code = 409
    type = "cancelled_error"


async def submit_openai(
    services: Services,
    body: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    principal: Principal,
    cancel_after: float | None = None,
) -> Job:
    ignored = body.ignored_fields()
    if ignored:
        log.debug("ignoring unsupported fields of %s: %s", ENDPOINTS[kind], ", ".join(ignored))
    try:
        req = body.to_job()
    except ValidationError as exc:
        message, param = describe_validation(exc.errors())
        raise InvalidRequest(message, param=param) from None
    default = COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completion" else None
    return await submit_job(
        services,
        req,
        principal,
        default_max_tokens=default,
        endpoint=ENDPOINTS[kind],
        request_id=logs.request_id.get(),
        cancel_after=cancel_after,
    )


def response_id(kind: Kind, job_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id.removeprefix("job_")


def _usage(job: Job) -> Usage:
    prompt, completion = job.prompt_tokens or 0, job.completion_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def render(job: Job, kind: Kind) -> ChatCompletion | Completion:
    """The OpenAI response object of a finished job; an error for a failed or cancelled one."""
    if job.status == JobStatus.FAILED.value:
        raise JobFailed(JOB_FAILED.format(job_id=job.id, message=job.error_message or job.error_type))
    if job.status != JobStatus.SUCCEEDED.value:
        timed_out = job.finish_reason == FinishReason.TIMEOUT.value
        raise JobCancelled((JOB_TIMED_OUT if timed_out else JOB_CANCELLED).format(job_id=job.id))
    created = int(job.created_at.timestamp())
    asked = bool(job.request.get("logprobs"))
    outputs = job.choices or [
        {"index": 0, "text": job.output or "", "finish_reason": job.finish_reason, "logprobs": job.logprobs}
    ]
    if kind == "chat":
        return ChatCompletion(
            id=response_id(kind, job.id),
            created=created,
            model=job.model,
            choices=[
                ChatChoice(
                    index=out["index"],
                    message=_message(job, out["text"], out["index"]),
                    finish_reason=_reason(out["finish_reason"]),
                    logprobs=ChoiceLogprobs.model_validate({"content": out.get("logprobs") or []})
                    if asked
                    else None,
                )
                for out in outputs
            ],
            usage=_usage(job),
        )
    return Completion(
        id=response_id(kind, job.id),
        created=created,
        model=job.model,
        choices=[
            CompletionChoice(
                index=out["index"],
                text=out["text"],
                finish_reason=_reason(out["finish_reason"]),
                logprobs=CompletionLogprobs.model_validate(completion_logprobs(out.get("logprobs") or []))
                if asked
                else None,
            )
            for out in outputs
        ],
        usage=_usage(job),
    )


def _message(job: Job, text: str, index: int) -> AssistantMessage:
    """A chat answer: its text, or (for a request with tools) its content and calls."""
    parsed = parsed_answer(job.request, text)
    if parsed is None or not parsed.calls:
        return AssistantMessage(content=text)
    calls = chat_tool_calls(job.id, parsed.calls, index)
    return AssistantMessage(content=parsed.content, tool_calls=calls)  # type: ignore[arg-type]


def _reason(finish_reason: str | None) -> Any:
    if finish_reason in (FinishReason.LENGTH.value, FinishReason.TOOL_CALLS.value):
        return finish_reason
    return "stop"


async def cancel_quietly(services: Services, job_id: str) -> None:
    with contextlib.suppress(ApiError):
        await cancel_job(services, job_id)
        log.info("job %s cancelled: its client disconnected", job_id)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_job(
    services: Services,
    job: Job,
    request: Request,
    load: Callable[[Services, str], Awaitable[Job | None]] = load_job,
    *,
    fresh: bool = False,
) -> Job | None:
    """The finished job (read by `load`), or None when the client went away first (the job is then
    cancelled, if so set). `fresh`: the job was created by this request (see job_events)."""
    end = asyncio.create_task(until_end(services, job.id, fresh=fresh))
    gone = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({end, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not end.done():
            if services.settings.cancel_on_disconnect:
                services.spawn(cancel_quietly(services, job.id))
            return None
        end.result()
    finally:
        for task in (end, gone):
            task.cancel()
        await asyncio.gather(end, gone, return_exceptions=True)
    finished = await load(services, job.id)
    assert finished is not None
    return finished


def _error_chunk(message: str, type_: str) -> str:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}})


class _Chunks:
    """Builds the chunk objects of one streamed response."""

    def __init__(self, kind: Kind, job: Job, include_usage: bool) -> None:
        self.kind = kind
        self.id = response_id(kind, job.id)
        self.job_id = job.id
        self.model = job.model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.logprobs = bool(job.request.get("logprobs"))
        # Per choice, characters of the logprobs' tokens so far (completions' text_offset).
        self._offsets: dict[int, int] = {}

    def _dump(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return json.dumps(chunk, separators=(",", ":"))

    def text(
        self,
        text: str,
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
        index: int = 0,
    ) -> str:
        if self.kind == "chat":
            delta = {"content": text} if text or finish_reason is None else {}
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason}
        shaped = self._logprobs(logprobs, index) if self.logprobs and finish_reason is None else None
        choice["logprobs"] = shaped
        return self._dump([choice])

    def _logprobs(self, entries: list[dict[str, Any]] | None, index: int) -> dict[str, Any]:
        entries = entries or []
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + sum(len(e["token"]) for e in entries)
        return completion_logprobs(entries, offset)

    def calls(self, deltas: list[CallDelta], index: int, logprobs: list[dict[str, Any]] | None) -> list[str]:
        """The chunks of an answer's new content and call pieces (OpenAI's `delta.tool_calls`: a call's
        first chunk has its id, type and name; the next ones pieces of its arguments)."""
        out = []
        for d in deltas:
            if d.done:
                continue
            if d.index < 0:
                delta: dict[str, Any] = {"content": d.content}
            elif d.name is not None:
                call = {"index": d.index, "id": call_id(self.job_id, d.index, index), "type": "function"}
                delta = {"tool_calls": [{**call, "function": {"name": d.name, "arguments": ""}}]}
            else:
                delta = {"tool_calls": [{"index": d.index, "function": {"arguments": d.arguments}}]}
            choice = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
            out.append(choice)
        if self.logprobs and logprobs:
            if not out:
                out.append({"index": index, "delta": {}, "finish_reason": None, "logprobs": None})
            out[0]["logprobs"] = self._logprobs(logprobs, index)
        return [self._dump([c]) for c in out]

    def role(self, index: int = 0) -> str:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return self._dump([{**choice, "logprobs": None}])

    def usage(self, usage: dict[str, Any]) -> str:
        return self._dump([], usage)


async def stream_job(services: Services, job: Job, kind: Kind, include_usage: bool) -> AsyncIterator[str]:
    """The job's events as OpenAI chunks, then `[DONE]`. If the client leaves first, the job is cancelled
    (when so configured)."""
    chunks = _Chunks(kind, job, include_usage)
    ended = False
    n = int(job.request.get("n") or 1)
    sent = [0] * n  # characters already streamed, per choice
    # Each choice's text so far (a retried job continues it; only text past `sent` goes out).
    texts = [""] * n
    # A chat with tools: each choice's text as content and call pieces (shared/tool_parsers.py).
    calls = [CallStream() for _ in range(n)] if kind == "chat" and calls_allowed(job.request) else None
    try:
        if kind == "chat":
            for i in range(n):
                yield chunks.role(i)
        async for event in job_events(services, job.id):
            texts = [text_after(text, event, i) for i, text in enumerate(texts)]
            if event.event == "token":
                for chunk in _token_chunks(chunks, event, texts, sent, calls):
                    yield chunk
            elif event.event == "done":
                ended = True
                for chunk in _end_chunks(chunks, event, texts, calls):
                    yield chunk
                break
            elif event.event == "error":
                ended = True
                message = JOB_FAILED.format(job_id=job.id, message=event.data.get("message", ""))
                yield _error_chunk(message, JobFailed.type)
                break
        yield "[DONE]"
    finally:
        if not ended and services.settings.cancel_on_disconnect:
            services.spawn(cancel_quietly(services, job.id))


def _token_chunks(
    chunks: _Chunks, event: Event, texts: list[str], sent: list[int], calls: list[CallStream] | None
) -> list[str]:
    """The chunks of a token event: its choice's new text (and logprobs), or, for a chat with tools,
    that text's new content and call pieces."""
    i = min(choice_of(event), len(texts) - 1)
    if calls is not None:
        return chunks.calls(calls[i].feed(texts[i]), i, event.data.get(LOGPROBS))
    if len(texts[i]) > sent[i] or event.data.get(LOGPROBS):
        new, sent[i] = texts[i][sent[i] :], max(sent[i], len(texts[i]))
        return [chunks.text(new, logprobs=event.data.get(LOGPROBS), index=i)]
    return []


def _end_chunks(chunks: _Chunks, event: Event, texts: list[str], calls: list[CallStream] | None) -> list[str]:
    """The chunks of the done event: the calls' last pieces, each choice's finish_reason, the usage; or
    the error of a job that was cancelled or ran out of time."""
    reason = event.data.get("finish_reason")
    if reason in (FinishReason.CANCELLED.value, FinishReason.TIMEOUT.value):
        why = JOB_TIMED_OUT if reason == FinishReason.TIMEOUT.value else JOB_CANCELLED
        return [_error_chunk(why.format(job_id=chunks.job_id), JobCancelled.type)]
    out = []
    for i, stream in enumerate(calls or []):
        out += chunks.calls(stream.finish(texts[i]), i, None)
    ends = event.data.get(CHOICES) or [{"index": 0, "finish_reason": reason}]
    for end in ends:
        out.append(chunks.text("", _reason(end["finish_reason"]), index=int(end["index"])))
    if chunks.include_usage:
        out.append(chunks.usage(event.data["usage"]))
    return out


class ClientGone(Exception):
    """The client of a foreground request left before its job finished."""


async def create_once(
    services: Services, principal: Principal, request: Request, create: Callable[[], Awaitable[Outcome]]
) -> tuple[Outcome, dict[str, str]] | Response:
    """Run a create route's `create` once per Idempotency-Key; its outcome and the headers every answer
    carries (the job's id, and whether it is a replay), or the 499 of a client that left meanwhile."""
    try:
        outcome = await run_idempotent(services, principal, request, create)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening any more
    assert outcome.job_id is not None
    headers = {JOB_ID: outcome.job_id}
    if outcome.replayed:
        headers[REPLAYED_HEADER] = "true"
    return outcome, headers
