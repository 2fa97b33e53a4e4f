"""The job state machine: a closed set of states and the moves allowed between them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Its deadline (Cancel-After) passed before it ever started: it ended without running.
    EXPIRED = "expired"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # queued -> cancelled: cancelled by its client, or (once it has run) past its deadline.
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.EXPIRED}
    ),
    # running -> queued: the worker was lost or drained; the job is tried again. A running job that
    # reaches its deadline is cancelled (finish_reason timeout), its partial output kept: it ran.
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}


def can_move(src: JobStatus, dst: JobStatus) -> bool:
    return dst in ALLOWED[src]


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    # It ended after tool calls (shared/tool_parsers.py found them in its text).
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"
    # A deadline ended it: Cancel-After, or timeout_seconds of running time.
    TIMEOUT = "timeout"


class BatchStatus(StrEnum):
    """OpenAI's batch statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


BATCH_TERMINAL: frozenset[BatchStatus] = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
