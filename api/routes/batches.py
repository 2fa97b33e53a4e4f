"""`/v1/batches`: offline batches in OpenAI's Batch API shape; the batch manager does the work."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, update

from api.batches.records import batch_object, job_counts
from api.http.deps import ServicesDep, SessionDep
from api.http.errors import Conflict, InvalidRequest, NotFound
from api.http.pagination import newest_first
from api.openai.protocol import BatchCreateRequest, BatchList, BatchObject
from api.tenancy.auth import Principal, PrincipalDep, QuotaDep
from api.tenancy.idempotency import REPLAYED_HEADER, Outcome, run_idempotent
from shared.models import Batch, File
from shared.states import BATCH_TERMINAL, BatchStatus

router = APIRouter(prefix="/v1/batches", tags=["batches"])

BATCH_NOT_FOUND = "no batch with id '{batch_id}'"
BATCH_FINISHED = "batch '{batch_id}' is already {status} and cannot be cancelled"
WINDOWS = {"24h": timedelta(hours=24)}


async def _object(session: SessionDep, batch: Batch) -> BatchObject:
    counts = await job_counts(session, [batch.id])
    return batch_object(batch, counts.get(batch.id, {}))


async def _get(session: SessionDep, principal: Principal, batch_id: str) -> Batch:
    batch = await session.get(Batch, batch_id)
    if batch is None or not principal.owns(batch.tenant):
        raise NotFound(BATCH_NOT_FOUND.format(batch_id=batch_id), param="batch_id")
    return batch


@router.post("", response_model=BatchObject, summary="Create a batch from an uploaded JSONL file")
async def create_batch(
    body: Annotated[BatchCreateRequest, Body()],
    session: SessionDep,
    services: ServicesDep,
    principal: PrincipalDep,
    request: Request,
    _quota: QuotaDep,
) -> JSONResponse:
    async def create() -> Outcome:
        batch = await _create(session, principal, body)
        return Outcome(200, batch_object(batch, {}).model_dump(mode="json"), None)

    outcome = await run_idempotent(services, principal, request, create)
    headers = {REPLAYED_HEADER: "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


async def _create(session: SessionDep, principal: Principal, body: BatchCreateRequest) -> Batch:
    async with session.begin():
        file = await session.get(File, body.input_file_id)
        if file is None or file.purpose != "batch" or not principal.owns(file.tenant):
            raise InvalidRequest(f"no batch input file with id '{body.input_file_id}'", param="input_file_id")
        batch = Batch(
            endpoint=body.endpoint,
            input_file_id=file.id,
            completion_window=body.completion_window,
            metadata_=body.metadata,
            tenant=principal.owner,
            api_key_id=principal.key_id,
            expires_at=func.now() + WINDOWS[body.completion_window],
        )
        session.add(batch)
    await session.refresh(batch)
    return batch


@router.get("/{batch_id}", response_model=BatchObject, summary="Get a batch, with live request counts")
async def get_batch(batch_id: str, session: SessionDep, principal: PrincipalDep) -> BatchObject:
    return await _object(session, await _get(session, principal, batch_id))


@router.get("", response_model=BatchList, summary="List batches, newest first")
async def list_batches(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="Id of the last batch of the previous page.")] = None,
) -> BatchList:
    page, has_more = await newest_first(
        session, principal, Batch, select(Batch), after=after, limit=limit, noun="batch"
    )
    counts = await job_counts(session, [b.id for b in page])
    return BatchList(
        data=[batch_object(b, counts.get(b.id, {})) for b in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.post(
    "/{batch_id}/cancel", response_model=BatchObject, summary="Cancel a batch; finished results are kept"
)
async def cancel_batch(batch_id: str, session: SessionDep, principal: PrincipalDep) -> BatchObject:
    async with session.begin():
        batch = await _get(session, principal, batch_id)
        status = BatchStatus(batch.status)
        if status in BATCH_TERMINAL or status is BatchStatus.FINALIZING:
            raise Conflict(BATCH_FINISHED.format(batch_id=batch_id, status=status.value), param="batch_id")
        await session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.status.in_([BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]),
            )
            .values(status=BatchStatus.CANCELLING.value, cancelling_at=func.now())
        )
    await session.refresh(batch)
    return await _object(session, batch)
