"""The webhook dispatcher (a duty: one API process at a time holds its lease): takes due rows of the
outbox, sends each signed per Standard Webhooks to the address the SSRF guard checked, and records the
try. Only 2xx counts as delivered; 410 disables the endpoint; every other answer or failure is tried
again on `webhooks.retry_schedule` (with jitter, and at least the receiver's `Retry-After`) until the
last try, after which the delivery is `failed`. Rows are claimed with `FOR UPDATE SKIP LOCKED` and
pushed out while they are being sent, so a second dispatcher (a lease that changed hands) never sends
the same try twice at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text, update

from api.http.services import Services
from api.jobs.views import job_response
from api.openai.responses import render as response_view
from api.webhooks import signing, ssrf
from shared import aio
from shared import headers as names
from shared import responses as response_wire
from shared.events import read_events, text_of
from shared.models import Job, WebhookDelivery, WebhookEndpoint, WebhookSecret
from shared.webhooks import EVENT_PREFIX, JOB_COMPLETED, OUTPUT

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4096  # of a receiver's answer, kept for the tenant to see
MAX_RETRY_AFTER_SECONDS = 86_400
_THROTTLED = {429, 502, 503, 504}

_CLAIM = text(
    """
    UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => :hold)
    WHERE id IN (
        SELECT id FROM webhook_deliveries
        WHERE status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at
        LIMIT :n
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
    """
)


class _Gone(Exception):
    """The delivery cannot be sent at all: it fails without further tries."""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get(names.RETRY_AFTER)
    if value is None:
        return None
    try:
        return min(max(0.0, float(value)), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        return None


class _Slots:
    """At most `n` deliveries in flight at once per target (an endpoint, or a job webhook's URL); a
    target's entry goes as soon as no delivery holds or waits for it, so one-off URLs leave nothing."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    async def acquire(self, target: str, timeout: float) -> bool:
        slot = self._slots.setdefault(target, asyncio.Semaphore(self.n))
        self._users[target] = self._users.get(target, 0) + 1
        try:
            await aio.wait_for(slot.acquire(), timeout)
        except TimeoutError:
            self._leave(target)
            return False
        return True

    def release(self, target: str) -> None:
        self._slots[target].release()
        self._leave(target)

    def _leave(self, target: str) -> None:
        self._users[target] -= 1
        if not self._users[target]:
            del self._users[target], self._slots[target]

    def __len__(self) -> int:
        return len(self._slots)


class WebhookDispatcher:
    name = "webhook-dispatcher"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings.webhooks
        self.interval = self.settings.tick_seconds
        self._client: httpx.AsyncClient | None = None
        self._slots = _Slots(self.settings.per_endpoint)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # No redirects: a receiver cannot send a delivery on to an address the guard did not check.
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.settings.timeout_seconds)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def tick(self) -> None:
        hold = self.settings.timeout_seconds * 3
        async with self.services.sessions() as session, session.begin():
            ids = list((await session.execute(_CLAIM, {"hold": hold, "n": self.settings.batch})).scalars())
        if ids:
            await asyncio.gather(*(self._deliver(delivery_id) for delivery_id in ids))

    async def _deliver(self, delivery_id: str) -> None:
        async with self.services.sessions() as session:
            delivery = await session.get(WebhookDelivery, delivery_id)
            if delivery is None or delivery.status != "pending":
                return
            endpoint = (
                await session.get(WebhookEndpoint, delivery.endpoint_id) if delivery.endpoint_id else None
            )
            try:
                url, keys = await self._destination(session, delivery, endpoint)
                body = delivery.body or await self._render(session, delivery)
            except _Gone as exc:
                await self._record(delivery, None, str(exc), final=True)
                return
        target = delivery.endpoint_id or url
        # A slow receiver must not hold its deliveries past their claim (another dispatcher could
        # take them meanwhile): one that waits too long for a slot goes back for the next tick.
        if not await self._slots.acquire(target, self.settings.timeout_seconds):
            await self._release(delivery.id)
            return
        try:
            await self._send(delivery, endpoint, url, keys, body)
        finally:
            self._slots.release(target)

    async def _release(self, delivery_id: str) -> None:
        async with self.services.sessions() as session, session.begin():
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending")
                .values(next_attempt_at=datetime.now(UTC))
            )

    async def _destination(
        self, session: Any, delivery: WebhookDelivery, endpoint: WebhookEndpoint | None
    ) -> tuple[str, list[str]]:
        if delivery.endpoint_id is not None:
            if endpoint is None:
                raise _Gone("the endpoint was deleted")
            if endpoint.disabled_at is not None:
                raise _Gone(f"the endpoint is disabled ({endpoint.disabled_reason})")
            keys = signing.live_secrets(
                endpoint.secret, endpoint.previous_secret, endpoint.previous_expires_at
            )
            return endpoint.url, keys
        secret = await session.get(WebhookSecret, delivery.tenant)
        if secret is None or not delivery.url:
            raise _Gone("the tenant has no webhook signing secret")
        return delivery.url, signing.live_secrets(
            secret.secret, secret.previous_secret, secret.previous_expires_at
        )

    async def _render(self, session: Any, delivery: WebhookDelivery) -> str:
        """The body, made at the first try and kept, so that every retry sends the same bytes."""
        created = int(delivery.created_at.timestamp())
        if delivery.endpoint_id is None:  # a job's own webhook: the job as GET /v1/jobs/{id} shows it
            job = await session.get(Job, delivery.subject_id)
            if job is None:
                raise _Gone("the job was deleted")
            view = job_response(job)
            if delivery.event_type == OUTPUT and view.output is None:  # still generating: its text so far
                view.output = text_of(await read_events(self.services.events_redis, job.id))
            payload: dict[str, Any] = {**view.model_dump(mode="json"), "type": delivery.event_type}
        else:  # OpenAI's event shape, which client.webhooks.unwrap() parses
            subject = delivery.subject_id
            data: dict[str, Any] = {"id": subject}
            if delivery.event_type.startswith("response."):
                data = {"id": response_wire.response_id(subject)}
            elif delivery.event_type == JOB_COMPLETED:
                job = await session.get(Job, subject)
                data["status"] = job.status if job is not None else None
                if job is not None and response_view.is_response(job):
                    data["response_id"] = response_wire.response_id(subject)
            payload = {
                "id": EVENT_PREFIX + delivery.id.removeprefix("msg_"),
                "object": "event",
                "created_at": created,
                "type": delivery.event_type,
                "data": data,
            }
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        async with self.services.sessions() as writer, writer.begin():
            await writer.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(body=body)
            )
        return body

    async def _send(
        self,
        delivery: WebhookDelivery,
        endpoint: WebhookEndpoint | None,
        url: str,
        keys: list[str],
        body: str,
    ) -> None:
        try:
            target = await ssrf.target(url, self.settings)
        except ssrf.UnsafeUrl as exc:
            await self._record(delivery, None, f"refused: {exc}", final=True)
            return
        now = datetime.now(UTC)
        request_headers = {
            "content-type": "application/json",
            "user-agent": "inferq-webhooks",
            "host": target.host_header,
            names.WEBHOOK_ID: delivery.id,
            names.WEBHOOK_TIMESTAMP: str(int(now.timestamp())),
            names.WEBHOOK_SIGNATURE: signing.signature(delivery.id, now, body, keys),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            request = self.client.build_request(
                "POST", target.url, content=body.encode(), headers=request_headers, extensions=extensions
            )
            response = await self.client.send(request, stream=True)
            try:
                answer = b""
                async for chunk in response.aiter_bytes():
                    answer += chunk
                    if len(answer) >= MAX_RESPONSE_BYTES:
                        break
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            await self._record(delivery, None, f"{type(exc).__name__}: {exc}"[:500])
            return
        code = response.status_code
        if 200 <= code < 300:
            await self._record(delivery, code, None, delivered=True)
        elif code == 410 and endpoint is not None:
            await self._disable(endpoint.id, "the receiver answered 410 Gone")
            await self._record(delivery, code, "410 Gone: endpoint disabled", final=True)
        elif code == 410:
            await self._record(delivery, code, "410 Gone", final=True)
        else:
            wait = _retry_after(response) if code in _THROTTLED else None
            await self._record(
                delivery, code, answer.decode(errors="replace")[:500] or None, retry_after=wait
            )

    async def _record(
        self,
        delivery: WebhookDelivery,
        code: int | None,
        error: str | None,
        *,
        delivered: bool = False,
        final: bool = False,
        retry_after: float | None = None,
    ) -> None:
        attempts = delivery.attempts + 1
        now = datetime.now(UTC)
        schedule = self.settings.retry_schedule
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_attempt_at": now,
            "last_status_code": code,
            "last_error": error,
        }
        if delivered:
            values.update(status="delivered", delivered_at=now)
            self.services.metrics.webhook_tries.labels("delivered").inc()
            self.services.metrics.webhook_latency.observe((now - delivery.created_at).total_seconds())
        elif final or attempts >= len(schedule) or delivery.event_type == OUTPUT:
            values["status"] = "failed"
            self.services.metrics.webhook_tries.labels("failed").inc()
            log.warning(
                "webhook %s (%s) failed after %d tries: %s", delivery.id, delivery.event_type, attempts, error
            )
        else:
            delay = schedule[attempts] * random.uniform(0.9, 1.1)
            values["next_attempt_at"] = now + timedelta(seconds=max(delay, retry_after or 0.0))
            self.services.metrics.webhook_tries.labels("retried").inc()
        async with self.services.sessions() as session, session.begin():
            await session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(**values)
            )

    async def _disable(self, endpoint_id: str, reason: str) -> None:
        async with self.services.sessions() as session, session.begin():
            await session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == endpoint_id)
                .values(disabled_at=datetime.now(UTC), disabled_reason=reason)
            )
        log.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)
