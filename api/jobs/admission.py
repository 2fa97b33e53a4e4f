"""Admission control: an interactive job is refused (429) rather than left to wait for ever when the
work queued ahead of it would take the fleet longer than `max_queue_seconds`.

The backlog is the prompt plus max_tokens of every queued interactive job of the model, in tokens; the
fleet's rate is what its live workers have shown they can generate (their best smoothed tokens/s).
While no worker has measured a rate yet, nothing is refused.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Integer, func, select

from api.http.errors import QUEUE_FULL, TooManyRequests
from api.http.services import Services
from shared.fleet import live_workers
from shared.models import Job
from shared.states import JobStatus

_CACHE_SECONDS = 0.5


def _budget() -> ColumnElement[Any]:
    return func.coalesce(Job.prompt_tokens, 0) + func.coalesce(
        Job.request["max_tokens"].astext.cast(Integer), 0
    )


async def fleet_capacity(
    services: Services, model: str, workers: list[dict[str, Any]] | None = None
) -> tuple[float, int]:
    """The fleet's rate for `model` (tokens/s) and its free engine slots (from `workers`, the registry
    as the caller read it, or read now)."""
    rate, free = 0.0, 0
    for w in workers if workers is not None else await live_workers(services.redis):
        if w.get("model") == model and not w.get("draining"):
            rate += max(float(w.get("tokens_per_s") or 0), float(w.get("tokens_per_s_peak") or 0))
            free += max(0, int(w.get("capacity") or 0) - int(w.get("running") or 0))
    return rate, free


@dataclass
class _Backlog:
    at: float
    tokens: int
    jobs: int
    rate: float
    free: int

    def wait_seconds(self) -> float:
        """Jobs that free engine slots will take at once do not wait; the rest wait their tokens' time."""
        if self.jobs <= self.free or self.rate <= 0:
            return 0.0
        return self.tokens * (self.jobs - self.free) / self.jobs / self.rate


class Admission:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._cache: dict[str, _Backlog] = {}
        self._refreshing: dict[str, asyncio.Task[_Backlog]] = {}

    async def _backlog(self, model: str) -> _Backlog:
        cached = self._cache.get(model)
        if cached is not None and time.monotonic() - cached.at < _CACHE_SECONDS:
            return cached
        # One refresh at a time per model: under load, every request that finds the figure stale
        # would otherwise run the same count over the queued jobs at once.
        task = self._refreshing.get(model)
        if task is None:
            task = asyncio.create_task(self._refresh(model))
            self._refreshing[model] = task
            task.add_done_callback(lambda _: self._refreshing.pop(model, None))
        return await asyncio.shield(task)

    async def _refresh(self, model: str) -> _Backlog:
        rate, free = await fleet_capacity(self.services, model)
        jobs = tokens = 0
        if rate > 0:  # with no measured rate nothing is refused, so the backlog is not needed
            async with self.services.sessions() as session:
                jobs, tokens = (
                    await session.execute(
                        select(func.count(), func.coalesce(func.sum(_budget()), 0)).where(
                            Job.status == JobStatus.QUEUED.value, Job.batch_id.is_(None), Job.model == model
                        )
                    )
                ).one()
        backlog = _Backlog(time.monotonic(), int(tokens), int(jobs), rate, free)
        self._cache[model] = backlog
        return backlog

    async def admit(self, model: str, tokens: int) -> None:
        backlog = await self._backlog(model)
        if backlog.rate <= 0:
            return
        limit = self.services.settings.max_queue_seconds
        seconds = backlog.wait_seconds()  # how long this job would wait before it starts
        if seconds > limit:
            retry = min(max(1, math.ceil(seconds - limit)), 3600)
            self.services.metrics.rejected.labels(model).inc()
            raise TooManyRequests(
                QUEUE_FULL.format(seconds=seconds, limit=limit),
                code="queue_full",
                headers={"Retry-After": str(retry)},
            )
        backlog.tokens += tokens  # until the next refresh, count what this process admits
        backlog.jobs += 1

    async def position(
        self, job: Job, workers: list[dict[str, Any]] | None = None
    ) -> tuple[int, float | None]:
        """Where a queued interactive job stands (1 = next), and the seconds until it should start."""
        async with self.services.sessions() as session:
            ahead, tokens = (
                await session.execute(
                    select(func.count(), func.coalesce(func.sum(_budget()), 0)).where(
                        Job.status == JobStatus.QUEUED.value,
                        Job.batch_id.is_(None),
                        Job.model == job.model,
                        Job.created_at < job.created_at,
                    )
                )
            ).one()
        rate, free = await fleet_capacity(self.services, job.model, workers)
        waiting = _Backlog(0.0, int(tokens), int(ahead), rate, free)
        return int(ahead) + 1, (round(waiting.wait_seconds(), 1) if rate > 0 else None)
