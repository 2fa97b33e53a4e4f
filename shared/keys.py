"""Redis key and channel names. Per-job keys share a `{job_id}` hash tag so they live on one cluster slot."""

from __future__ import annotations

CANCEL_CHANNEL = "inferq:cancel"
JOB_FUNCTION = "run_job"  # the arq function the API enqueues and the worker registers


def events_stream(job_id: str) -> str:
    return f"inferq:{{{job_id}}}:events"


def live_channel(job_id: str) -> str:
    return f"inferq:{{{job_id}}}:live"


def cancel_flag(job_id: str) -> str:
    return f"inferq:{{{job_id}}}:cancel"


WORKER_PREFIX = "inferq:worker:"


def worker_key(worker_id: str) -> str:
    return WORKER_PREFIX + worker_id
