"""API keys on every route (but health, readiness and metrics), and the tenant each key acts for.

Auth is `auto` by default: open until the first key is created (local use), then required for good:
revoking every key closes the API, it never opens it again (only `INFERQ_AUTH=off` does). What a process
read about a key is trusted for `auth_cache_seconds`, so a request costs no Postgres round trip; a revoked
key stops working within that time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Protocol, Self, TypeVar

from fastapi import Depends, Request
from sqlalchemy.orm import InstrumentedAttribute

from api.http.deps import ServicesDep
from api.http.errors import INVALID_KEY, MISSING_KEY, Unauthorized
from api.tenancy.ratelimit import check_token_quota, limit_requests
from shared.apikeys import DEFAULT_TENANT, key_id_of, matches


class _Filterable(Protocol):
    def where(self, *criteria: Any) -> Self: ...


S = TypeVar("S", bound=_Filterable)


@dataclass(frozen=True)
class Principal:
    """Who is asking: a key and its tenant, or nobody in particular while the API is open (who then
    sees every tenant's work and creates work for the `default` tenant). `admin` sees the whole fleet
    (every worker's jobs, hosts and pids); it reads other tenants' jobs no more than any key does."""

    tenant: str | None
    key_id: str | None = None
    rate_per_minute: int | None = None
    tokens_per_day: int | None = None
    admin: bool = False

    @property
    def owner(self) -> str:
        """The tenant what this principal creates belongs to."""
        return self.tenant or DEFAULT_TENANT

    def owns(self, tenant: str | None) -> bool:
        return self.tenant is None or tenant == self.tenant

    def scope(self, stmt: S, column: InstrumentedAttribute[str | None]) -> S:
        return stmt if self.tenant is None else stmt.where(column == self.tenant)


OPEN = Principal(tenant=None, admin=True)
# INFERQ_ADMIN_KEY: the operator's key, acting for the tenant that owns work made while the API was open.
ADMIN = Principal(tenant=DEFAULT_TENANT, admin=True)
# What a stream token minted with INFERQ_ADMIN_KEY names as its key (no api_keys row is that key).
ADMIN_TOKEN_SUBJECT = "admin"


async def authenticate(request: Request, services: ServicesDep) -> Principal:
    if not await services.auth.required():
        return OPEN
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(MISSING_KEY, code="invalid_api_key")
    if services.auth.is_admin_key(token):
        return ADMIN
    key_id = key_id_of(token)
    key = await services.auth.lookup(key_id) if key_id else None
    if key is None or key.revoked or not matches(token, key.key_hash):
        raise Unauthorized(INVALID_KEY, code="invalid_api_key")
    principal = Principal(key.tenant, key.id, key.rate_per_minute, key.tokens_per_day, key.admin)
    await limit_requests(services, principal.key_id, principal.rate_per_minute, request)
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def check_quota(request: Request, services: ServicesDep, principal: PrincipalDep) -> None:
    """For routes that start generation: refuse once the key's daily token quota is used up."""
    await check_token_quota(services, principal.key_id, principal.tokens_per_day, request)


QuotaDep = Annotated[None, Depends(check_quota)]
