"""Deadlines of a job: `Cancel-After` durations and the words both sides use for them."""

from __future__ import annotations

import re
from typing import Any, Final

from sqlalchemy import Update, func

from shared.models import Job
from shared.states import FinishReason, JobStatus
from shared.transitions import move

# Replicate's `Cancel-After` format (a Go duration: "30s", "5m", "1h30m", "250ms"), or bare seconds.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
BAD_DURATION = "must be a duration such as '30s', '5m', '1h30m' or '250ms', or a number of seconds"

# The error of a job that expired (never ran: its deadline passed while it waited).
EXPIRED_TYPE: Final = "deadline_exceeded"
EXPIRED_MESSAGE: Final = "its deadline (Cancel-After) passed before it started, so it never ran"


def parse_duration(text: str) -> float:
    """Seconds from a duration; ValueError with BAD_DURATION when it is not one (or is not positive)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _PART.finditer(value):
            if match.start() != pos:
                raise ValueError(BAD_DURATION) from None
            seconds += float(match.group(1)) * _UNIT[match.group(2)]
            pos = match.end()
        if pos == 0 or pos != len(value):
            raise ValueError(BAD_DURATION) from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(BAD_DURATION)
    return seconds


def expire_unstarted(job_id: str) -> Update:
    """Ends a job that never started and whose deadline has passed (`expired`), if it still waits;
    returns its prompt_tokens, model and batch_id. Worker and API race for it: the row decides."""
    return move(
        JobStatus.EXPIRED,
        Job.id == job_id,
        Job.attempts == 0,
        Job.deadline_at <= func.clock_timestamp(),
        src=JobStatus.QUEUED,
        finish_reason=FinishReason.TIMEOUT.value,
        output="",
        completion_tokens=0,
        error_type=EXPIRED_TYPE,
        error_message=EXPIRED_MESSAGE,
        finished_at=func.clock_timestamp(),
    ).returning(Job.prompt_tokens, Job.model, Job.batch_id)


def ended(prompt_tokens: int | None, completion_tokens: int, status: JobStatus) -> dict[str, Any]:
    """The `done` event of a job a deadline ended (status expired, or cancelled once it had run)."""
    prompt = prompt_tokens or 0
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    return {
        "finish_reason": FinishReason.TIMEOUT.value,
        "status": status.value,
        "usage": usage,
        "timings": {},
    }
