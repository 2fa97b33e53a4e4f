"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from api.http.deps import ServicesDep
from api.http.errors import NotFound
from api.http.services import Services
from api.jobs.deadlines import CancelAfterDep
from api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Model,
    ModelList,
)
from api.openai.serving import (
    ClientGone,
    Kind,
    create_once,
    render,
    stream_job,
    submit_openai,
    wait_for_job,
)
from api.streams.sse import load_job, sse_response
from api.tenancy.auth import Principal, PrincipalDep, QuotaDep
from api.tenancy.idempotency import Outcome
from shared.fleet import live_workers
from shared.headers import JOB_ID

router = APIRouter(prefix="/v1", tags=["openai"])

MODEL_NOT_FOUND = "no live worker serves model '{model}'"


async def _serve(
    services: Services,
    body: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    request: Request,
    principal: Principal,
    cancel_after: float | None,
) -> Response:
    async def create() -> Outcome:
        job = await submit_openai(services, body, kind, principal, cancel_after)
        if body.stream:
            return Outcome(200, None, job.id)  # the response is the job's stream; a replay streams it again
        finished = await wait_for_job(services, job, request)
        if finished is None:
            raise ClientGone
        return Outcome(200, render(finished, kind).model_dump(mode="json"), job.id)

    created = await create_once(services, principal, request, create)
    if isinstance(created, Response):
        return created
    outcome, headers = created
    if body.stream:
        job = await load_job(services, headers[JOB_ID])
        assert job is not None
        return sse_response(stream_job(services, job, kind, body.include_usage), services, headers)
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The response, or its chunks when `stream`."}
}


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=_STREAM_DOC,
    summary="Create a chat completion (OpenAI-compatible)",
)
async def chat_completions(
    body: Annotated[ChatCompletionRequest, Body()],
    services: ServicesDep,
    request: Request,
    principal: PrincipalDep,
    _quota: QuotaDep,
    cancel_after: CancelAfterDep,
) -> Response:
    return await _serve(services, body, "chat", request, principal, cancel_after)


@router.post(
    "/completions",
    response_model=Completion,
    responses=_STREAM_DOC,
    summary="Create a text completion (OpenAI-compatible)",
)
async def completions(
    body: Annotated[CompletionRequest, Body()],
    services: ServicesDep,
    request: Request,
    principal: PrincipalDep,
    _quota: QuotaDep,
    cancel_after: CancelAfterDep,
) -> Response:
    return await _serve(services, body, "completion", request, principal, cancel_after)


async def _models(services: Services) -> list[Model]:
    """The configured models (listed from the start, with 0 workers until one registers) and whatever
    live workers serve besides."""
    by_name = {name: Model(id=name, created=services.started_at, workers=0) for name in services.models}
    for worker in await live_workers(services.redis):
        name = str(worker.get("model") or "")
        if not name:
            continue
        started = int(worker.get("started_at") or 0)
        model = by_name.get(name)
        if model is None:
            by_name[name] = Model(id=name, created=started, workers=1)
        else:
            model.created = started if model.workers == 0 else min(model.created, started)
            model.workers += 1
    for model in by_name.values():
        model.capabilities = (await services.capabilities.of(model.id)).to_json()
    return sorted(by_name.values(), key=lambda m: m.id)


@router.get(
    "/models", response_model=ModelList, summary="List the configured models and those live workers serve"
)
async def list_models(services: ServicesDep) -> ModelList:
    return ModelList(data=await _models(services))


@router.get("/models/{model_id:path}", response_model=Model, summary="Get one served model")
async def get_model(model_id: str, services: ServicesDep) -> Model:
    for model in await _models(services):
        if model.id == model_id:
            return model
    raise NotFound(MODEL_NOT_FOUND.format(model=model_id), param="model", code="model_not_found")
