"""`Prefer: wait=N` (RFC 7240): a request that returns once its job has finished, or after N seconds.

The wait follows the job's own events (the relay's live channel), never a polling loop, so a thousand
waiting clients cost the API one subscription each and no queries while they wait.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from api.http.errors import InvalidRequest
from api.http.services import Services
from api.streams.sse import until_end
from shared import aio, headers

MAX_WAIT_SECONDS = 60
BAD_PREFER = "Prefer: wait must be a whole number of seconds from 1 to {limit}, e.g. 'Prefer: wait=30'"
_WAIT = re.compile(r"^\s*wait\s*=\s*(\S*)\s*$", re.IGNORECASE)


def wait_seconds(request: Request) -> int | None:
    """The `wait=N` preference of the request, if any; 400 when it is malformed or out of range.
    Other preferences (`respond-async`, ...) are left alone, as RFC 7240 asks."""
    value = None
    for header in request.headers.getlist(headers.PREFER):
        for preference in header.split(","):
            match = _WAIT.match(preference.split(";")[0])
            if match:
                value = match.group(1).strip('"')
    if value is None:
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_WAIT_SECONDS:
        raise InvalidRequest(BAD_PREFER.format(limit=MAX_WAIT_SECONDS), param=headers.PREFER)
    return int(value)


async def wait_for_end(services: Services, job_id: str, seconds: float) -> bool:
    """True once the job has ended, False when `seconds` passed first."""
    try:
        await aio.wait_for(until_end(services, job_id), seconds)
    except TimeoutError:
        return False
    return True


def retry_after(status: str, eta_seconds: float | None) -> str | None:
    """When a poll of an unfinished job is worth making again, in whole seconds."""
    if status == "running":
        return "1"
    if status == "queued":
        return str(max(1, min(30, round(eta_seconds or 1))))
    return None
