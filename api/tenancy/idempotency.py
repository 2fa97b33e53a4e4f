"""Idempotency-Key (Stripe's semantics): a retry with the same key and body gets the first response
and creates nothing; the same key with another body is a 409. Keys are per tenant and hold for
`idempotency_ttl_seconds`. Records live in Postgres, next to what they protect.

Only requests that went through are remembered: one that failed (a 4xx or 5xx) releases its key, so
that a corrected retry can use it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.dialects.postgresql import insert
from starlette.requests import Request

from api.http.errors import Conflict, InvalidRequest
from api.http.services import Services
from api.tenancy.auth import Principal
from shared.models import IdempotencyRecord

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_REUSED = "Idempotency-Key '{key}' was used with a different request within the last 24 hours"
KEY_IN_FLIGHT = "a request with Idempotency-Key '{key}' is still being processed; retry shortly"
MAX_KEY_CHARS = 255


@dataclass
class Outcome:
    status_code: int
    body: dict[str, Any] | None
    job_id: str | None
    replayed: bool = False


def _fingerprint(request: Request, body: bytes) -> str:
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    return hashlib.sha256(
        request.method.encode() + b" " + request.url.path.encode() + b"\n" + canonical
    ).hexdigest()


async def _claim(services: Services, tenant: str, key: str, fingerprint: str) -> Outcome | None:
    """None: this request owns the key now. Otherwise the first request's outcome."""
    for _ in range(2):
        async with services.sessions() as session, session.begin():
            inserted = await session.scalar(
                insert(IdempotencyRecord)
                .values(tenant=tenant, key=key, fingerprint=fingerprint)
                .on_conflict_do_nothing()
                .returning(IdempotencyRecord.key)
            )
            if inserted is not None:
                return None
            row = await session.get(IdempotencyRecord, (tenant, key))
            if row is None:
                continue  # released meanwhile
            ttl = timedelta(seconds=services.settings.idempotency_ttl_seconds)
            if row.created_at < datetime.now(UTC) - ttl:
                await session.delete(row)
                continue
            if row.fingerprint != fingerprint:
                raise Conflict(KEY_REUSED.format(key=key), param=HEADER, code="idempotency_key_reused")
            if row.status_code is None:
                raise Conflict(KEY_IN_FLIGHT.format(key=key), param=HEADER, code="idempotency_key_in_use")
            return Outcome(row.status_code, row.response, row.job_id, replayed=True)
    raise Conflict(KEY_IN_FLIGHT.format(key=key), param=HEADER, code="idempotency_key_in_use")


async def run_idempotent(
    services: Services,
    principal: Principal,
    request: Request,
    create: Callable[[], Awaitable[Outcome]],
) -> Outcome:
    """Run `create` once per (tenant, Idempotency-Key, request); replay its outcome for retries."""
    key = request.headers.get(HEADER)
    if key is None:
        return await create()
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"{HEADER} must be 1 to {MAX_KEY_CHARS} characters", param=HEADER)
    tenant = principal.tenant or ""
    replay = await _claim(services, tenant, key, _fingerprint(request, await request.body()))
    if replay is not None:
        return replay
    where = (IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
    try:
        outcome = await create()
    except BaseException:
        async with services.sessions() as session, session.begin():
            await session.execute(delete(IdempotencyRecord).where(*where))
        raise
    async with services.sessions() as session, session.begin():
        await session.execute(
            update(IdempotencyRecord)
            .where(*where)
            .values(status_code=outcome.status_code, response=outcome.body, job_id=outcome.job_id)
        )
    return outcome
