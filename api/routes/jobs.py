"""Native jobs API: submit, poll, list, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.auth import PrincipalDep, QuotaDep
from api.cancellation import cancel_job
from api.deps import ServicesDep, SessionDep
from api.errors import JOB_NOT_FOUND, NotFound
from api.idempotency import REPLAYED_HEADER, Outcome, run_idempotent
from api.pagination import newest_first
from api.submission import submit_job
from api.views import job_response, job_urls
from shared import logs
from shared.fleet import live_workers
from shared.models import Job
from shared.schemas import JobCreatedResponse, JobCreateRequest, JobListResponse, JobResponse
from shared.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NO_WORKER = "no live worker serves model '{model}'; the job waits until one does"


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreatedResponse,
    summary="Submit a generation job",
)
async def create_job(
    body: Annotated[JobCreateRequest, Body()],
    services: ServicesDep,
    principal: PrincipalDep,
    request: Request,
    _quota: QuotaDep,
) -> JSONResponse:
    async def create() -> Outcome:
        job = await submit_job(services, body, principal, request_id=logs.request_id.get())
        created = JobCreatedResponse(
            id=job.id,
            status=JobStatus.QUEUED,
            model=job.model,
            created_at=job.created_at,
            urls=job_urls(job.id),
        )
        return Outcome(202, created.model_dump(mode="json"), job.id)

    outcome = await run_idempotent(services, principal, request, create)
    headers = {"Location": job_urls(outcome.job_id or "").self}
    if outcome.replayed:
        headers[REPLAYED_HEADER] = "true"
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


@router.get("/{job_id}", response_model=JobResponse, summary="Get a job: status, output, usage, timings")
async def get_job(
    job_id: str, session: SessionDep, services: ServicesDep, principal: PrincipalDep
) -> JobResponse:
    job = await session.get(Job, job_id)
    if job is None or not principal.owns(job.tenant):
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    response = job_response(job)
    if job.status == JobStatus.QUEUED.value:
        serving = {w.get("model") for w in await live_workers(services.redis) if not w.get("draining")}
        if job.model not in serving:
            response.waiting = NO_WORKER.format(model=job.model)
        elif job.batch_id is None:
            response.queue_position, response.eta_seconds = await services.admission.position(job)
    return response


@router.get("", response_model=JobListResponse, summary="List jobs, newest first")
async def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    batch_id: Annotated[str | None, Query(description="Only the jobs of this batch.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="Id of the last job of the previous page.")] = None,
) -> JobListResponse:
    stmt = select(Job)
    if status_ is not None:
        stmt = stmt.where(Job.status == status_.value)
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    jobs, has_more = await newest_first(session, principal, Job, stmt, after=after, limit=limit, noun="job")
    return JobListResponse(
        data=[job_response(j) for j in jobs], has_more=has_more, next_after=jobs[-1].id if has_more else None
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobResponse,
    responses={202: {"model": JobResponse}, 409: {"description": "The job has already finished"}},
    summary="Cancel a queued or running job",
)
async def cancel(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    job, final = await cancel_job(services, job_id, principal)
    # 202: the worker has been told but has not confirmed yet; poll the job.
    return JSONResponse(job_response(job).model_dump(mode="json"), status_code=200 if final else 202)
