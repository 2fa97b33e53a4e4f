"""Webhook endpoints of a tenant, in OpenAI's shape (`client.webhooks.create / list / retrieve /
update / delete / rotate_secret` of the official SDK manage them), their deliveries, and the tenant's
signing secret for the webhooks named on jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from api.http.deps import ServicesDep, SessionDep
from api.http.errors import NotFound
from api.http.pagination import newest_first
from api.http.services import Services
from api.tenancy.auth import Principal, PrincipalDep
from api.webhooks import signing, ssrf
from shared.models import WebhookDelivery, WebhookEndpoint, WebhookSecret
from shared.webhooks import ENDPOINT_EVENT_TYPES

router = APIRouter(tags=["webhooks"])

ENDPOINT_NOT_FOUND = "no webhook endpoint with id '{id}'"
UNKNOWN_EVENT = "unknown event type '{type}'; one of: {known}"
NO_TENANT_SECRET = (
    "this tenant has no webhook signing secret yet: create one with POST /v1/webhook_secret "
    "(or `inferq webhooks secret`)"
)


def _check_types(value: list[str]) -> list[str]:
    for kind in value:
        if kind not in ENDPOINT_EVENT_TYPES:
            raise ValueError(UNKNOWN_EVENT.format(type=kind, known=", ".join(sorted(ENDPOINT_EVENT_TYPES))))
    return list(dict.fromkeys(value))


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=ssrf.MAX_URL_CHARS, description="Where events are POSTed (http or https).")
    event_types: list[str] = Field(min_length=1, description="e.g. job.completed, batch.completed.")
    name: str | None = Field(default=None, max_length=200)

    _types = field_validator("event_types")(_check_types)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=ssrf.MAX_URL_CHARS)
    event_types: list[str] | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, max_length=200)
    enabled: bool | None = Field(default=None, description="true: enable an endpoint disabled by a 410.")

    @field_validator("event_types")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _check_types(value)


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def render_endpoint(endpoint: WebhookEndpoint, *, secret: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": endpoint.id,
        "object": "webhook_endpoint",
        "created_at": _ts(endpoint.created_at),
        "updated_at": _ts(endpoint.updated_at),
        "name": endpoint.name or "",
        "url": endpoint.url,
        "event_types": endpoint.event_types,
        "signing_secret_hint": signing.hint(endpoint.secret),
        "status": "disabled" if endpoint.disabled_at else "enabled",
        "disabled_reason": endpoint.disabled_reason,
    }
    if secret:
        out["signing_secret"] = endpoint.secret  # shown here, at creation and rotation, only
    return out


def render_delivery(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "object": "webhook_delivery",
        "event_type": delivery.event_type,
        "subject_id": delivery.subject_id,
        "endpoint_id": delivery.endpoint_id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": _ts(delivery.created_at),
        "last_attempt_at": _ts(delivery.last_attempt_at),
        "next_attempt_at": _ts(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "delivered_at": _ts(delivery.delivered_at),
    }


async def _endpoint(session: Any, principal: Principal, endpoint_id: str) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or not principal.owns(endpoint.tenant):
        raise NotFound(ENDPOINT_NOT_FOUND.format(id=endpoint_id))
    return endpoint  # type: ignore[no-any-return]


def _page(rows: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": rows,
        "first_id": rows[0]["id"] if rows else None,
        "last_id": rows[-1]["id"] if rows else None,
        "has_more": has_more,
    }


def _overlap(services: Services) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=services.settings.webhooks.rotation_overlap_seconds)


@router.post("/v1/webhook_endpoints", summary="Create a webhook endpoint (its signing secret is shown once)")
async def create_endpoint(
    body: Annotated[EndpointCreate, Body()], services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    await ssrf.check_at_submit(body.url, services.settings.webhooks, "url")
    endpoint = WebhookEndpoint(
        tenant=principal.owner,
        name=body.name or ssrf.parse(body.url)[1],
        url=body.url,
        event_types=body.event_types,
        secret=signing.new_secret(),
    )
    async with services.sessions() as session, session.begin():
        session.add(endpoint)
    return render_endpoint(endpoint, secret=True)


@router.get("/v1/webhook_endpoints", summary="List webhook endpoints, newest first")
async def list_endpoints(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    rows, more = await newest_first(
        session,
        principal,
        WebhookEndpoint,
        select(WebhookEndpoint),
        after=after,
        limit=limit,
        noun="endpoint",
    )
    return _page([render_endpoint(e) for e in rows], more)


@router.get("/v1/webhook_endpoints/{endpoint_id}", summary="Get a webhook endpoint")
async def get_endpoint(endpoint_id: str, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    return render_endpoint(await _endpoint(session, principal, endpoint_id))


@router.post("/v1/webhook_endpoints/{endpoint_id}", summary="Change a webhook endpoint's URL, name or events")
async def update_endpoint(
    endpoint_id: str,
    body: Annotated[EndpointUpdate, Body()],
    services: ServicesDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    if body.url is not None:
        await ssrf.check_at_submit(body.url, services.settings.webhooks, "url")
    async with services.sessions() as session, session.begin():
        endpoint = await _endpoint(session, principal, endpoint_id)
        for name in ("url", "name", "event_types"):
            if getattr(body, name) is not None:
                setattr(endpoint, name, getattr(body, name))
        if body.enabled:
            endpoint.disabled_at = endpoint.disabled_reason = None
        endpoint.updated_at = datetime.now(UTC)
    return render_endpoint(endpoint)


@router.delete("/v1/webhook_endpoints/{endpoint_id}", summary="Delete a webhook endpoint")
async def delete_endpoint(endpoint_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    async with services.sessions() as session, session.begin():
        await session.delete(await _endpoint(session, principal, endpoint_id))
    return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.post(
    "/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
    summary="Give an endpoint a new signing secret; the old one signs too for a while",
)
async def rotate_endpoint_secret(
    endpoint_id: str, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.sessions() as session, session.begin():
        endpoint = await _endpoint(session, principal, endpoint_id)
        endpoint.previous_secret, endpoint.previous_expires_at = endpoint.secret, _overlap(services)
        endpoint.secret = signing.new_secret()
        endpoint.updated_at = datetime.now(UTC)
    return render_endpoint(endpoint, secret=True)


@router.get(
    "/v1/webhook_endpoints/{endpoint_id}/deliveries", summary="An endpoint's deliveries, newest first"
)
async def list_deliveries(
    endpoint_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    await _endpoint(session, principal, endpoint_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    rows, more = await newest_first(
        session, principal, WebhookDelivery, stmt, after=after, limit=limit, noun="delivery"
    )
    return _page([render_delivery(d) for d in rows], more)


def _render_secret(row: WebhookSecret) -> dict[str, Any]:
    expires = row.previous_expires_at
    return {
        "object": "webhook_secret",
        "tenant": row.tenant,
        "secret": row.secret,
        "previous_valid_until": _ts(expires) if expires and expires > datetime.now(UTC) else None,
    }


@router.get(
    "/v1/webhook_secret",
    summary="The tenant's signing secret for job webhooks",
    responses={404: {"description": "The tenant has no secret yet (POST /v1/webhook_secret makes one)."}},
)
async def get_tenant_secret(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    row = await session.get(WebhookSecret, principal.owner)
    if row is None:
        raise NotFound(NO_TENANT_SECRET)
    return _render_secret(row)


@router.post(
    "/v1/webhook_secret",
    summary="Create the tenant's signing secret for job webhooks; one it has already is returned unchanged",
    responses={201: {"description": "Created: the tenant had no secret."}},
)
async def create_tenant_secret(services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    # Asking again must not rotate: every receiver verifying with the secret it was given would start
    # refusing deliveries. Rotation is its own route.
    async with services.sessions() as session, session.begin():
        # Two first requests at once: one INSERT wins, and both return its secret.
        created = await session.scalar(
            insert(WebhookSecret)
            .values(tenant=principal.owner, secret=signing.new_secret())
            .on_conflict_do_nothing(index_elements=[WebhookSecret.tenant])
            .returning(WebhookSecret.tenant)
        )
        row = await session.get(WebhookSecret, principal.owner)
        assert row is not None  # inserted now, or there already
    return JSONResponse(_render_secret(row), status_code=201 if created is not None else 200)


@router.post(
    "/v1/webhook_secret/rotate",
    summary="Give the tenant a new signing secret for job webhooks; the old one signs too for a while",
)
async def rotate_tenant_secret(services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    secret = signing.new_secret()
    async with services.sessions() as session, session.begin():
        row = await session.get(WebhookSecret, principal.owner, with_for_update=True)
        if row is None:
            row = WebhookSecret(tenant=principal.owner, secret=secret)
            session.add(row)
        else:
            row.previous_secret, row.previous_expires_at = row.secret, _overlap(services)
            row.secret = secret
    return _render_secret(row)
