"""`GET /v1/workers`: the live worker fleet, from the registry the workers keep in Redis."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.http.deps import ServicesDep
from shared.fleet import live_workers

router = APIRouter(prefix="/v1/workers", tags=["workers"])


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    host: str
    device: str
    model: str
    capacity: int = Field(description="Requests its engine runs at once.")
    running: int = Field(description="Jobs it holds now.")
    jobs: list[str] = Field(default_factory=list, description="Ids of the jobs it holds.")
    tokens_per_s: float = Field(description="Generated tokens per second, smoothed over a few seconds.")
    draining: bool = Field(description="Finishing its jobs before it stops; it takes no new ones.")
    started_at: float = Field(description="Unix time it started.")
    version: str
    pid: int | None = Field(default=None, description="Its process id on its host.")
    metrics_url: str | None = Field(
        default=None, description="Its Prometheus /metrics (TTFT, ITL, queue time, e2e); null when off."
    )


class WorkerList(BaseModel):
    object: str = "list"
    data: list[WorkerInfo]


@router.get("", response_model=WorkerList, summary="List live workers")
async def list_workers(services: ServicesDep) -> WorkerList:
    workers: list[dict[str, Any]] = await live_workers(services.redis)
    return WorkerList(data=[WorkerInfo.model_validate(w) for w in workers])
