"""`GET /v1/stats`: the queue and fleet figures of /metrics as JSON, per model, for dashboards (the web
console samples it) that cannot read the Prometheus text format conveniently."""

from __future__ import annotations

import time

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.http.deps import ServicesDep
from api.http.metrics import fleet_figures

router = APIRouter(prefix="/v1/stats", tags=["stats"])


class ModelStats(BaseModel):
    model: str
    waiting: dict[str, int] = Field(description="Jobs queued, per lane: interactive and batch.")
    running: int = Field(description="Jobs running.")
    workers: int = Field(description="Live workers serving the model.")
    capacity: int = Field(description="Engine slots of those workers.")
    free_slots: int = Field(description="Of those, the slots no job holds now.")
    tokens_per_s: float = Field(description="Tokens/s the workers generate now (smoothed).")


class Stats(BaseModel):
    object: str = "stats"
    time: float = Field(description="Unix time of the reading.")
    models: list[ModelStats]


@router.get("", response_model=Stats, summary="Queue depth, running jobs and fleet figures, per model")
async def stats(services: ServicesDep) -> Stats:
    figures = await fleet_figures(services)
    return Stats(
        time=time.time(),
        models=[ModelStats(model=name, **vars(f)) for name, f in sorted(figures.items())],
    )
