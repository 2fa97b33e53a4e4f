"""Admitting a job: check it against the limits and the model, store it, enqueue it."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import delete

from api.http.errors import InvalidRequest, ServiceUnavailable
from api.http.services import ModelInfo, Services
from api.jobs.enqueue import Enqueue
from api.jobs.inserts import job_row
from api.tenancy.auth import Principal
from api.tenancy.ratelimit import quota_key
from api.webhooks import ssrf
from shared import headers, structured, tools
from shared.models import Job, WebhookSecret, new_job_id
from shared.prompts import prompt_token_ids
from shared.schemas import JobCreateRequest
from shared.states import JobStatus

log = logging.getLogger(__name__)

_TOKENIZE_IN_THREAD_CHARS = 20_000
N_OVER_LIMIT = "n must be at most {limit}"
NO_WEBHOOK_SECRET = (
    "this tenant has no webhook signing secret yet: create one with POST /v1/webhook_secret "
    "(or `inferq webhooks secret`) and keep it to verify deliveries"
)


def resolve_model(services: Services, name: str | None) -> ModelInfo:
    """The model a request names (the default one when it names none); 400 for one not served here."""
    if name is None:
        return services.model
    model = services.models.get(name)
    if model is None:
        available = ", ".join(f"'{m}'" for m in services.models)
        raise InvalidRequest(f"model '{name}' is not served here; available: {available}", param="model")
    return model


def _check_limits(services: Services, req: JobCreateRequest) -> None:
    limits = services.settings.limits
    if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens must be at most {limits.max_tokens}", param="max_tokens")
    if req.n is not None and req.n > limits.max_n:
        raise InvalidRequest(N_OVER_LIMIT.format(limit=limits.max_n), param="n")
    if req.stop is not None:
        if len(req.stop) > limits.max_stop:
            raise InvalidRequest(f"at most {limits.max_stop} stop strings are allowed", param="stop")
        if any(len(s) > limits.max_stop_chars for s in req.stop):
            raise InvalidRequest(
                f"stop strings are limited to {limits.max_stop_chars} characters", param="stop"
            )
    if req.metadata_bytes() > limits.max_metadata_bytes:
        raise InvalidRequest(
            f"metadata is limited to {limits.max_metadata_bytes} bytes of JSON", param="metadata"
        )
    if req.response_format is not None:
        try:
            # The grammar the worker will build, built here too (cached by schema): a schema it could
            # not enforce is a 400 now, not a failed job later.
            structured.check(req.response_format.model_dump(exclude_none=True), limits.max_schema_bytes)
        except structured.SchemaError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None


def _check_tools(services: Services, request: dict[str, Any]) -> None:
    """The tools' schemas and the grammar the worker will build from them (cached), checked now."""
    try:
        tools.check(request, services.settings.limits.max_schema_bytes)
    except tools.ToolsError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None


def deadlines(
    services: Services,
    cancel_after: float | None,
    field_cancel_after: float | None = None,
    timeout_seconds: float | None = None,
) -> tuple[datetime | None, float | None]:
    """The job's Cancel-After deadline (the earlier of the header's and the field's) and its running
    time bound (asked for, or the default), each checked against its maximum."""
    limits = services.settings.limits
    asked = [s for s in (cancel_after, field_cancel_after) if s is not None]
    cancel_at = None
    if asked:
        seconds = float(min(asked))
        if seconds > limits.max_cancel_after_seconds:
            param = "cancel_after" if field_cancel_after == seconds else headers.CANCEL_AFTER
            raise InvalidRequest(
                f"a deadline can be at most {limits.max_cancel_after_seconds:g} seconds away", param=param
            )
        cancel_at = datetime.now(UTC) + timedelta(seconds=seconds)
    timeout = timeout_seconds if timeout_seconds is not None else limits.default_timeout_seconds
    if timeout is not None and timeout > limits.max_timeout_seconds:
        if timeout_seconds is None:  # a default over the maximum: the maximum applies
            return cancel_at, limits.max_timeout_seconds
        raise InvalidRequest(
            f"timeout_seconds must be at most {limits.max_timeout_seconds:g}", param="timeout_seconds"
        )
    return cancel_at, timeout


async def _count_prompt_tokens(model: ModelInfo, request: dict[str, Any], param: str) -> int:
    tokenizer = model.tokenizer
    messages = request.get("messages") or []
    size = len(request.get("prompt") or "") + sum(len(m.get("content") or "") for m in messages)
    try:
        if size > _TOKENIZE_IN_THREAD_CHARS:
            ids = await asyncio.to_thread(prompt_token_ids, tokenizer, request)
        else:
            ids = prompt_token_ids(tokenizer, request)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None
    return len(ids)


async def prepare_job(
    services: Services,
    req: JobCreateRequest,
    principal: Principal,
    *,
    default_max_tokens: int | None = None,
    endpoint: str | None = None,
    extra: dict[str, Any] | None = None,
    cancel_after: float | None = None,
) -> Job:
    """Check a request against the limits and the model's context; the unsaved job that would run it.
    `cancel_after`: the seconds of a `Cancel-After` header."""
    model = resolve_model(services, req.model)
    _check_limits(services, req)
    cancel_after_field = float(req.cancel_after) if req.cancel_after is not None else None
    cancel_at, timeout = deadlines(services, cancel_after, cancel_after_field, req.timeout_seconds)
    limits = services.settings.limits
    max_tokens = req.max_tokens or min(default_max_tokens or limits.default_max_tokens, limits.max_tokens)
    request = req.model_dump(exclude_none=True, exclude={"metadata", "cancel_after", "timeout_seconds"})
    request.update(model=model.name, max_tokens=max_tokens)
    if endpoint is not None:
        request["endpoint"] = endpoint
    request.update(extra or {})  # what a route keeps with the job for itself (e.g. a response's input)
    _check_tools(services, request)
    if principal.key_id is not None and principal.tokens_per_day is not None:
        request["quota_key"] = quota_key(principal.key_id)  # the worker adds the tokens it generates
    await services.capabilities.check(model.name, request)
    param = "messages" if req.messages is not None else "prompt"
    prompt_tokens = await _count_prompt_tokens(model, request, param)
    if prompt_tokens > limits.max_prompt_tokens:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}", param=param
        )
    context = model.context_length
    if prompt_tokens + max_tokens > context:
        raise InvalidRequest(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context of {context} tokens",
            param=param,
        )
    return Job(
        id=new_job_id(),
        status=JobStatus.QUEUED.value,
        model=model.name,
        request=request,
        metadata_=req.metadata,
        prompt_tokens=prompt_tokens,
        attempts=0,
        tenant=principal.owner,
        api_key_id=principal.key_id,
        cancel_at=cancel_at,
        timeout_seconds=timeout,
        deadline_at=cancel_at,  # the running-time part joins it when the job first starts
    )


async def check_job_webhook(services: Services, url: str, tenant: str) -> None:
    """A job's own webhook: a URL the SSRF guard lets through, and a secret to sign it with."""
    await ssrf.check_at_submit(url, services.settings.webhooks, "webhook")
    async with services.sessions() as session:
        if await session.get(WebhookSecret, tenant) is None:
            raise InvalidRequest(NO_WEBHOOK_SECRET, param="webhook", code="no_webhook_secret")


async def submit_job(
    services: Services,
    req: JobCreateRequest,
    principal: Principal,
    *,
    default_max_tokens: int | None = None,
    endpoint: str | None = None,
    request_id: str | None = None,
    extra: dict[str, Any] | None = None,
    cancel_after: float | None = None,
) -> Job:
    """Admit an interactive job: checked against the backlog, stored in Postgres first, then enqueued;
    503 (and nothing kept) if Redis refuses it."""
    job = await prepare_job(
        services,
        req,
        principal,
        default_max_tokens=default_max_tokens,
        endpoint=endpoint,
        extra=extra,
        cancel_after=cancel_after,
    )
    job.request_id = request_id
    if req.webhook is not None:
        await check_job_webhook(services, req.webhook, job.tenant or principal.owner)
    outputs = int(job.request.get("n") or 1)  # the prompt once, each output's tokens
    return await admit_and_enqueue(
        services, job, (job.prompt_tokens or 0) + outputs * int(job.request["max_tokens"])
    )


async def admit_and_enqueue(services: Services, job: Job, work_tokens: int) -> Job:
    """The admission check (`work_tokens`: what the job will cost the fleet), then the job stored in
    Postgres and enqueued; 503 (and nothing kept) if Redis refuses it."""
    await services.admission.admit(job.model, work_tokens)
    # Concurrent submissions share one INSERT + commit, then one Redis pipeline (shared/grouped.py).
    job.created_at = await services.insert_job(job_row(job))
    try:
        await services.enqueue_job(Enqueue(services.settings.queues.for_model(job.model), job.id, job.tenant))
    except (RedisError, OSError) as exc:
        # Not accepted, so not kept: the client gets 503 and retries.
        log.warning("enqueue of %s failed: %s", job.id, exc)
        async with services.sessions() as session, session.begin():
            await session.execute(delete(Job).where(Job.id == job.id))
        raise ServiceUnavailable("redis") from None
    return job
