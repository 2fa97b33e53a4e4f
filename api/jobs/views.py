"""Rendering ORM jobs as API responses."""

from __future__ import annotations

from typing import Any

from shared.models import Job
from shared.schemas import JobError, JobResponse, JobUrls, Timings, Usage
from shared.tool_parsers import chat_tool_calls, parsed_answer


def job_urls(job_id: str) -> JobUrls:
    base = f"/v1/jobs/{job_id}"
    return JobUrls(self=base, events=f"{base}/events", cancel=f"{base}/cancel")


def job_response(job: Job) -> JobResponse:
    usage = None
    if job.prompt_tokens is not None:
        completion = job.completion_tokens or 0
        usage = Usage(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=completion,
            total_tokens=job.prompt_tokens + completion,
        )
    parsed = parsed_answer(job.request, job.output)
    tool_calls = chat_tool_calls(job.id, parsed.calls) if parsed is not None and parsed.calls else None
    choices = job.choices
    if choices and parsed is not None:
        choices = [_with_calls(job, choice) for choice in choices]
    error = JobError(type=job.error_type, message=job.error_message or "") if job.error_type else None
    return JobResponse(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        model=job.model,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        request=job.request,
        output=job.output,
        logprobs=job.logprobs,  # type: ignore[arg-type]
        choices=choices,  # type: ignore[arg-type]
        tool_calls=tool_calls,  # type: ignore[arg-type]
        finish_reason=job.finish_reason,
        usage=usage,
        timings=Timings(
            queue_ms=job.queue_ms, ttft_ms=job.ttft_ms, total_ms=job.total_ms, tokens_per_s=job.tokens_per_s
        ),
        attempts=job.attempts,
        worker_id=job.worker_id,
        peak_batch_size=job.peak_batch_size,
        error=error,
        metadata=job.metadata_,
        request_id=job.request_id,
        batch_id=job.batch_id,
        custom_id=job.custom_id,
        data_removed=job.data_removed_at is not None,
        cancel_at=job.cancel_at,
        timeout_seconds=job.timeout_seconds,
        deadline_at=job.deadline_at,
        urls=job_urls(job.id),
    )


def _with_calls(job: Job, choice: dict[str, Any]) -> dict[str, Any]:
    parsed = parsed_answer(job.request, choice.get("text"))
    if parsed is None or not parsed.calls:
        return choice
    return {**choice, "tool_calls": chat_tool_calls(job.id, parsed.calls, int(choice["index"]))}
