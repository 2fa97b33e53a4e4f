"""Batches and files as OpenAI objects, live request counts, and the lines of the results files."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from api.http.errors import ApiError
from api.openai.embeddings import render_embeddings
from api.openai.protocol import BatchErrors, BatchObject, FileObject, RequestCounts
from api.openai.responses import render as response_view
from api.openai.serving import JOB_FAILED, JobFailed, render
from shared.models import Batch, File, Job
from shared.states import JobStatus

BATCH_CANCELLED = "the batch was cancelled before this request ran to completion"
BATCH_EXPIRED = "the request could not be executed before the completion window expired"


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_object(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.size,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
    )


async def job_counts(session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per batch, how many of its jobs are in each status."""
    if not batch_ids:
        return {}
    stmt = (
        select(Job.batch_id, Job.status, func.count())
        .where(Job.batch_id.in_(batch_ids))
        .group_by(Job.batch_id, Job.status)
    )
    counts: dict[str, dict[str, int]] = {}
    for batch_id, status, n in await session.execute(stmt):
        counts.setdefault(str(batch_id), {})[status] = n
    return counts


def batch_object(batch: Batch, counts: dict[str, int]) -> BatchObject:
    failed = counts.get(JobStatus.FAILED.value, 0) + len(batch.rejected or [])
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=BatchErrors.model_validate({"data": batch.errors}) if batch.errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=int(batch.created_at.timestamp()),
        in_progress_at=_ts(batch.in_progress_at),
        expires_at=_ts(batch.expires_at),
        finalizing_at=_ts(batch.finalizing_at),
        completed_at=_ts(batch.completed_at),
        failed_at=_ts(batch.failed_at),
        expired_at=_ts(batch.expired_at),
        cancelling_at=_ts(batch.cancelling_at),
        cancelled_at=_ts(batch.cancelled_at),
        request_counts=RequestCounts(
            total=batch.total, completed=counts.get(JobStatus.SUCCEEDED.value, 0), failed=failed
        ),
        metadata=batch.metadata_,
    )


def _line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def result_line(job: Job, kind: Any, expired: bool) -> tuple[bool, dict[str, Any]]:
    """(whether it belongs in the output file, the line) for one of the batch's jobs."""
    line: dict[str, Any] = {"id": _line_id(), "custom_id": job.custom_id, "response": None, "error": None}
    if job.status == JobStatus.CANCELLED.value:
        code, message = ("batch_expired", BATCH_EXPIRED) if expired else ("batch_cancelled", BATCH_CANCELLED)
        line["error"] = {"code": code, "message": message}
        return False, line
    try:
        body = _body(job, kind)
        status = 200
    except ApiError as exc:
        body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
        status = exc.status_code
    line["response"] = {"status_code": status, "request_id": job.id, "body": body}
    return status == 200, line


def _body(job: Job, kind: Any) -> dict[str, Any]:
    """The line's response body: what the endpoint would have answered for the job."""
    if kind == "embeddings":
        return render_embeddings(job, job.embedding)
    if kind == "responses":
        if job.status == JobStatus.FAILED.value:  # a failed request, as in the other endpoints' lines
            raise JobFailed(JOB_FAILED.format(job_id=job.id, message=job.error_message or job.error_type))
        return response_view.render(job)
    return render(job, kind).model_dump(mode="json")


def rejected_line(entry: dict[str, Any]) -> dict[str, Any]:
    response = {"status_code": entry["status_code"], "request_id": None, "body": {"error": entry["error"]}}
    return {"id": _line_id(), "custom_id": entry["custom_id"], "response": response, "error": None}
