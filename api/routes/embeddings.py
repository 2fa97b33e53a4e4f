"""`/v1/embeddings` (OpenAI-compatible): each request is a job, answered once its worker has embedded it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from api.http.deps import ServicesDep
from api.jobs.deadlines import CancelAfterDep
from api.openai.embeddings import EmbeddingRequest, load_with_vectors, render_embeddings, submit_embeddings
from api.openai.serving import ClientGone, create_once, wait_for_job
from api.tenancy.auth import PrincipalDep, QuotaDep
from api.tenancy.idempotency import Outcome

router = APIRouter(prefix="/v1", tags=["openai"])

_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}},
        "description": "OpenAI's embeddings list: one vector per input, in input order, and usage.",
    }
}


@router.post(
    "/embeddings",
    response_class=JSONResponse,
    responses=_DOC,
    summary="Create embeddings (OpenAI-compatible)",
)
async def create_embeddings(
    body: Annotated[EmbeddingRequest, Body()],
    services: ServicesDep,
    request: Request,
    principal: PrincipalDep,
    _quota: QuotaDep,
    cancel_after: CancelAfterDep,
) -> Response:
    async def create() -> Outcome:
        job = await submit_embeddings(services, body, principal, cancel_after)
        finished = await wait_for_job(services, job, request, load_with_vectors, fresh=True)
        if finished is None:
            raise ClientGone
        rendered = render_embeddings(finished, finished.embedding)
        return Outcome(200, rendered, job.id)

    created = await create_once(services, principal, request, create)
    if isinstance(created, Response):
        return created
    outcome, headers = created
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)
