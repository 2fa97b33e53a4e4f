"""Per-key limits kept in Redis: requests per window and generated tokens per UTC day, with OpenAI's
`x-ratelimit-*` headers on every response to a key that has limits."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.errors import QUOTA_EXHAUSTED, RATE_LIMITED, TooManyRequests
from api.http.services import Services
from shared import keys

# Every x-ratelimit-* header a response may carry (CORS exposes them to pages on other origins).
HEADER_NAMES = tuple(
    f"x-ratelimit-{part}-{unit}"
    for unit in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `12s`, `1h2m3s`."""
    total = max(0, math.ceil(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def _add_headers(request: Request, headers: dict[str, str]) -> None:
    existing: dict[str, str] = getattr(request.state, "rate_headers", {})
    request.state.rate_headers = {**existing, **headers}


async def limit_requests(services: Services, key_id: str | None, limit: int | None, request: Request) -> None:
    if key_id is None or limit is None:
        return
    window = services.settings.rate_window_seconds
    now = time.time()
    slot = int(now // window)
    reset = (slot + 1) * window - now
    name = keys.request_window(key_id, slot)
    async with services.redis.pipeline(transaction=True) as pipe:
        pipe.incr(name)
        pipe.expire(name, window + 1)
        count, _ = await pipe.execute()
    headers = {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(max(0, limit - int(count))),
        "x-ratelimit-reset-requests": _duration(reset),
    }
    _add_headers(request, headers)
    if int(count) > limit:
        retry = max(1, math.ceil(reset))
        raise TooManyRequests(
            RATE_LIMITED.format(limit=limit, window=window, retry=retry),
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(retry)},
        )


def quota_key(key_id: str) -> str:
    return keys.token_quota(key_id, datetime.now(UTC).strftime("%Y%m%d"))


async def check_token_quota(
    services: Services, key_id: str | None, limit: int | None, request: Request
) -> None:
    """Refuse new work once the key's tokens generated today (workers add each job's) reach its quota."""
    if key_id is None or limit is None:
        return
    used = int(await services.redis.get(quota_key(key_id)) or 0)
    now = datetime.now(UTC)
    reset = (datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1) - now).total_seconds()
    headers = {
        "x-ratelimit-limit-tokens": str(limit),
        "x-ratelimit-remaining-tokens": str(max(0, limit - used)),
        "x-ratelimit-reset-tokens": _duration(reset),
    }
    _add_headers(request, headers)
    if used >= limit:
        raise TooManyRequests(
            QUOTA_EXHAUSTED.format(limit=limit),
            code="token_quota_exceeded",
            headers={**headers, "Retry-After": str(max(1, math.ceil(reset)))},
        )


class RateLimitHeaders:
    """Puts the `x-ratelimit-*` headers a request collected on its response, whatever it was."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                state: dict[str, Any] = scope.get("state") or {}
                extra = state.get("rate_headers") or {}
                if extra:
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    message["headers"] = [
                        *message.get("headers", []),
                        *((k.encode(), v.encode()) for k, v in extra.items() if k.encode() not in present),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
