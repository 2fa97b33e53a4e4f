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


def token_quota(key_id: str, day: str) -> str:
    """Tokens generated under an API key on one UTC day (YYYYMMDD); the worker adds each job's."""
    return f"inferq:quota:{key_id}:{day}"


def request_window(key_id: str, window: int) -> str:
    return f"inferq:rate:{key_id}:{window}"


def wake_channel(queue: str) -> str:
    """Published to on every enqueue: idle workers of the queue wake at once instead of polling."""
    return f"{queue}:wake"


def fair_clock(queue: str) -> str:
    """Per-tenant virtual start times of one queue (fair queuing between tenants)."""
    return f"{queue}:fair"
