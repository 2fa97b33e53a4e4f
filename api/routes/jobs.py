"""Native jobs API: submit, poll, list, cancel."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.duties.retention import remove
from api.http.deps import ServicesDep, SessionDep
from api.http.errors import JOB_NOT_FOUND, Conflict, NotFound
from api.http.pagination import newest_first
from api.jobs.cancellation import cancel_job
from api.jobs.deadlines import CancelAfterDep
from api.jobs.submission import submit_job
from api.jobs.views import job_response, job_urls
from api.jobs.waiting import retry_after, wait_for_end, wait_seconds
from api.streams.sse import load_job
from api.tenancy.auth import PrincipalDep, QuotaDep
from api.tenancy.idempotency import REPLAYED_HEADER, Outcome, run_idempotent
from shared import logs
from shared.fleet import live_workers
from shared.headers import PREFERENCE_APPLIED, RETRY_AFTER
from shared.models import Job, WebhookDelivery
from shared.schemas import (
    JobCreatedResponse,
    JobCreateRequest,
    JobListResponse,
    JobResponse,
    WebhookDeliveryStatus,
)
from shared.states import TERMINAL, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NO_WORKER = "no live worker serves model '{model}'; the job waits until one does"
STILL_STOPPING = "job '{job_id}' is still stopping after its cancel; delete it again in a moment"


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreatedResponse,
    responses={200: {"model": JobResponse, "description": "With `Prefer: wait=N`: the finished job."}},
    summary="Submit a generation job",
    description="`Prefer: wait=N` (1-60) returns the whole job once it has finished (200), or as it "
    "stands after N seconds (202).",
)
async def create_job(
    body: Annotated[JobCreateRequest, Body()],
    services: ServicesDep,
    principal: PrincipalDep,
    request: Request,
    _quota: QuotaDep,
    cancel_after: CancelAfterDep,
) -> JSONResponse:
    wait = wait_seconds(request)  # a bad Prefer header is refused before anything is created

    async def create() -> Outcome:
        job = await submit_job(
            services, body, principal, request_id=logs.request_id.get(), cancel_after=cancel_after
        )
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
    if wait is None or outcome.job_id is None or outcome.status_code != 202:
        return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)
    # Prefer: wait=N: the whole job once it has finished (200), or as it stands after N seconds (202).
    await wait_for_end(services, outcome.job_id, wait)
    job = await load_job(services, outcome.job_id)
    if job is None:  # removed meanwhile
        raise NotFound(JOB_NOT_FOUND.format(job_id=outcome.job_id))
    headers[PREFERENCE_APPLIED] = f"wait={wait}"
    finished = JobStatus(job.status) in TERMINAL
    hint = None if finished else retry_after(job.status, None)
    if hint is not None:
        headers[RETRY_AFTER] = hint
    waited = job_response(job).model_dump(mode="json")
    return JSONResponse(waited, status_code=200 if finished else 202, headers=headers)


@router.get(
    "/{job_id}",
    response_model=JobResponse,
    summary="Get a job: status, output, usage, timings",
    description="`Prefer: wait=N` (1-60) answers once the job has finished or N seconds passed; an "
    "unfinished job's answer carries `Retry-After`.",
)
async def get_job(
    job_id: str, services: ServicesDep, principal: PrincipalDep, request: Request, reply: Response
) -> JobResponse:
    wait = wait_seconds(request)
    # Short sessions, none held while waiting: 200 clients waiting at once must not hold 200 of the
    # pool's connections (they did, and everyone else got the pool's timeout).
    job = await load_job(services, job_id)
    if job is None or not principal.owns(job.tenant):
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    if wait is not None:
        reply.headers[PREFERENCE_APPLIED] = f"wait={wait}"
        if JobStatus(job.status) not in TERMINAL and await wait_for_end(services, job_id, wait):
            job = await load_job(services, job_id)
            if job is None:  # removed meanwhile
                raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    response = job_response(job)
    if "webhook" in job.request:
        stmt = select(WebhookDelivery).where(
            WebhookDelivery.subject_id == job.id, WebhookDelivery.endpoint_id.is_(None)
        )
        async with services.sessions() as session:
            deliveries = (await session.execute(stmt.order_by(WebhookDelivery.created_at))).scalars()
            response.webhooks = [
                WebhookDeliveryStatus.model_validate(d, from_attributes=True) for d in deliveries
            ]
    if job.status == JobStatus.QUEUED.value:
        workers = await live_workers(services.redis)  # read once per poll: O(workers), no SCAN
        if job.model not in {w.get("model") for w in workers if not w.get("draining")}:
            response.waiting = NO_WORKER.format(model=job.model)
        elif job.batch_id is None:
            response.queue_position, response.eta_seconds = await services.admission.position(job, workers)
    hint = retry_after(job.status, response.eta_seconds)
    if hint is not None:  # a poll of an unfinished job: when asking again is worth it
        reply.headers[RETRY_AFTER] = hint
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


@router.delete(
    "/{job_id}",
    response_model=JobResponse,
    responses={409: {"description": "The job is still stopping; retry in a moment"}},
    summary="Remove a job's prompt, output and events; its row stays with usage and timings",
)
async def delete_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobResponse:
    job = await load_job(services, job_id)
    if job is None or not principal.owns(job.tenant):
        raise NotFound(JOB_NOT_FOUND.format(job_id=job_id))
    if JobStatus(job.status) not in TERMINAL:
        with contextlib.suppress(Conflict):  # finished meanwhile
            await cancel_job(services, job_id, principal)
    await remove(services, [job_id])
    job = await load_job(services, job_id)
    assert job is not None
    if job.data_removed_at is None:
        raise Conflict(STILL_STOPPING.format(job_id=job_id), param="id")
    return job_response(job)
