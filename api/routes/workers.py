"""`GET /v1/workers`: the live worker fleet, from the registry the workers keep in Redis, shown by
audience. An admin key (or an open API) sees everything; a tenant key sees each worker's load and its
own running jobs only: other tenants' job ids, and the hosts, pids and metrics URLs of the machines,
are not its business (job ids are meant to be unguessable handles, and who runs what when is data)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api.http.deps import ServicesDep
from api.http.services import Services
from api.tenancy.auth import Principal, PrincipalDep
from shared.fleet import live_workers
from shared.models import Job

router = APIRouter(prefix="/v1/workers", tags=["workers"])

FleetView = Literal["full", "tenant"]


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(description="The worker's id (full view: host:pid:device; tenant view: an opaque id).")
    host: str | None = Field(default=None, description="Its host name (full view only).")
    device: str
    model: str
    capacity: int = Field(description="Requests its engine runs at once.")
    running: int = Field(description="Jobs it holds now, every tenant's.")
    jobs: list[str] = Field(
        default_factory=list,
        description="Ids of the jobs it holds (tenant view: the asking tenant's only; `running` counts all).",
    )
    tokens_per_s: float = Field(description="Generated tokens per second, smoothed over a few seconds.")
    draining: bool = Field(description="Finishing its jobs before it stops; it takes no new ones.")
    started_at: float = Field(description="Unix time it started.")
    version: str
    pid: int | None = Field(default=None, description="Its process id on its host (full view only).")
    metrics_url: str | None = Field(
        default=None,
        description="Its Prometheus /metrics (TTFT, ITL, queue time, e2e); null when off, and in the "
        "tenant view.",
    )


class WorkerList(BaseModel):
    object: str = "list"
    view: FleetView = Field(
        description="full: every worker's jobs, hosts, pids and metrics URLs (an admin key, or an open "
        "API); tenant: the asking tenant's own jobs only (other tenants' running jobs are counted, not "
        "listed)."
    )
    data: list[WorkerInfo]


# What a tenant's view keeps of a registry entry; everything else (host, pid, metrics URL, counters a
# later worker version adds) is left out unless listed here.
_TENANT_FIELDS = (
    "device",
    "model",
    "capacity",
    "running",
    "tokens_per_s",
    "draining",
    "started_at",
    "version",
)


def opaque_worker_id(worker_id: str) -> str:
    """A stable id that names a worker without its host and pid."""
    return "wrk_" + hashlib.sha256(worker_id.encode()).hexdigest()[:16]


async def _own_jobs(services: Services, tenant: str, job_ids: set[str]) -> set[str]:
    if not job_ids:
        return set()
    async with services.sessions() as session:
        rows = await session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.tenant == tenant))
        return set(rows)


async def fleet_view(services: Services, principal: Principal) -> WorkerList:
    workers: list[dict[str, Any]] = await live_workers(services.redis)
    if principal.admin:
        return WorkerList(view="full", data=[WorkerInfo.model_validate(w) for w in workers])
    held = {job for w in workers for job in w.get("jobs") or ()}
    own = await _own_jobs(services, principal.owner, held)
    return WorkerList(
        view="tenant",
        data=[
            WorkerInfo(
                id=opaque_worker_id(str(w.get("id"))),
                jobs=[job for job in w.get("jobs") or () if job in own],
                **{k: w[k] for k in _TENANT_FIELDS if k in w},
            )
            for w in workers
        ],
    )


@router.get("", response_model=WorkerList, summary="List live workers")
async def list_workers(services: ServicesDep, principal: PrincipalDep) -> WorkerList:
    return await fleet_view(services, principal)
