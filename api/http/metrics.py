"""The API's Prometheus metrics at `GET /metrics`: HTTP requests by route and status, and the queue and
fleet figures (jobs waiting per queue, running, live workers, fleet rate and free slots). A scrape reads
what is already counted: the worker registry (O(workers)), the interactive queues' lengths in Redis, and
the batch jobs queued in Postgres at most once per `BATCH_COUNT_SECONDS` per process; never a SCAN of
the keyspace nor a count over the jobs table per scrape. Per-job latencies and token counts come from
each worker's own `/metrics` (`inferq worker --metrics-port`). With INFERQ_METRICS_TOKEN set, both need
it as a bearer token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.deps import ServicesDep
from api.http.errors import Unauthorized
from api.http.services import Services
from shared.fleet import live_workers
from shared.metrics_auth import METRICS_TOKEN_CODE, METRICS_TOKEN_REQUIRED, authorized
from shared.models import Job
from shared.states import JobStatus

_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# Most of a batch waits in Postgres (the batch manager feeds its queue in Redis a few hundred jobs at a
# time), so batch jobs are counted there, and this often at most, whatever the scrape rate.
BATCH_COUNT_SECONDS = 5.0


class _BatchWaiting:
    """Batch jobs queued, per model, as one process last counted them in Postgres."""

    def __init__(self) -> None:
        self._at = -BATCH_COUNT_SECONDS
        self._counts: dict[str, int] = {}
        self._lock = asyncio.Lock()  # one count at a time: concurrent scrapes share the next

    async def read(self, services: Services) -> dict[str, int]:
        async with self._lock:
            if time.monotonic() - self._at >= BATCH_COUNT_SECONDS:
                async with services.sessions() as session:
                    rows = (
                        await session.execute(
                            select(Job.model, func.count())
                            .where(Job.status == JobStatus.QUEUED.value, Job.batch_id.isnot(None))
                            .group_by(Job.model)
                        )
                    ).all()
                self._counts = {str(model): int(count) for model, count in rows}
                self._at = time.monotonic()
            return self._counts


class ApiMetrics:
    def __init__(self) -> None:
        self.batch_waiting = _BatchWaiting()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inferq:http_requests",
            "HTTP requests by route and status.",
            ("method", "route", "status"),
            registry=r,
        )
        self.latency = Histogram(
            "inferq:http_request_duration_seconds",
            "Time to the response's first byte (streams: to their start).",
            ("method", "route"),
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge(
            "inferq:num_requests_waiting",
            "Jobs queued, per model and queue.",
            ("model_name", "queue"),
            registry=r,
        )
        self.running = Gauge(
            "inferq:num_requests_running", "Jobs running, per model.", ("model_name",), registry=r
        )
        self.workers = Gauge("inferq:workers_alive", "Live workers, per model.", ("model_name",), registry=r)
        self.slots = Gauge(
            "inferq:fleet_free_slots",
            "Free engine slots of live workers, per model.",
            ("model_name",),
            registry=r,
        )
        self.rate = Gauge(
            "inferq:fleet_tokens_per_second",
            "Tokens/s the live workers generate now.",
            ("model_name",),
            registry=r,
        )
        self.rejected = Counter(
            "inferq:admission_rejected",
            "Jobs refused by admission control (429).",
            ("model_name",),
            registry=r,
        )
        self.webhook_tries = Counter(
            "inferq:webhook_deliveries",
            "Webhook tries sent by this API process, by outcome: delivered, retried, failed.",
            ("outcome",),
            registry=r,
        )
        self.webhook_latency = Histogram(
            "inferq:webhook_delivery_latency_seconds",
            "From the event (its outbox row) to its delivery being acknowledged.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0),
            registry=r,
        )


class HttpMetrics:
    """ASGI middleware: counts every request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()


router = APIRouter(tags=["health"])


LANES = ("interactive", "batch")


@dataclass
class ModelFigures:
    """One model's queue and fleet, as /metrics and GET /v1/stats show them."""

    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LANES, 0))
    running: int = 0
    workers: int = 0
    capacity: int = 0
    free_slots: int = 0
    tokens_per_s: float = 0.0


async def fleet_figures(services: Services) -> dict[str, ModelFigures]:
    """Per model (every configured one, and any other that live workers serve or batch jobs name): the
    live workers' figures and running jobs from the registry, interactive jobs waiting from their queue
    in Redis (its length less the jobs workers hold: arq keeps a job there until it ends), batch jobs
    waiting from Postgres (`_BatchWaiting`)."""
    figures = {model: ModelFigures() for model in services.models}
    held: dict[str, list[str]] = {}
    for w in await live_workers(services.redis):
        model = str(w.get("model") or "")
        f = figures.setdefault(model, ModelFigures())
        capacity = int(w.get("capacity") or 0)
        f.workers += 1
        f.capacity += capacity
        f.running += int(w.get("running") or 0)
        f.free_slots += max(0, capacity - int(w.get("running") or 0))
        f.tokens_per_s += float(w.get("tokens_per_s") or 0)
        held.setdefault(model, []).extend(str(j) for j in w.get("jobs") or ())
    for model, count in (await services.metrics.batch_waiting.read(services)).items():
        figures.setdefault(model, ModelFigures()).waiting[LANES[1]] = count
    models = list(figures)
    async with services.redis.pipeline(transaction=False) as pipe:
        for model in models:
            queue = services.settings.queues.for_model(model)
            pipe.zcard(queue)
            if held.get(model):
                pipe.zmscore(queue, held[model])
        replies = iter(await pipe.execute())
    for model in models:
        in_queue = int(next(replies))
        if held.get(model):
            in_queue -= sum(score is not None for score in next(replies))
        figures[model].waiting[LANES[0]] = max(0, in_queue)
    return figures


async def _metrics_token(
    services: ServicesDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> None:
    if not authorized(authorization, services.settings.metrics_token):
        raise Unauthorized(
            METRICS_TOKEN_REQUIRED, code=METRICS_TOKEN_CODE, headers={"WWW-Authenticate": "Bearer"}
        )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        401: {"description": "INFERQ_METRICS_TOKEN is set, and the request lacks it."},
    },
    summary="Prometheus metrics",
    description="Open unless INFERQ_METRICS_TOKEN is set; then `Authorization: Bearer <token>`.",
    dependencies=[Depends(_metrics_token)],
)
async def metrics(services: ServicesDep) -> Response:
    m = services.metrics
    figures = await fleet_figures(services)
    for gauge in (m.waiting, m.running, m.workers, m.slots, m.rate):
        gauge.clear()
    for model, f in figures.items():
        for lane, count in f.waiting.items():
            m.waiting.labels(model, lane).set(count)
        m.running.labels(model).set(f.running)
        if f.workers:  # a model no live worker serves has no fleet figures
            m.workers.labels(model).set(f.workers)
            m.slots.labels(model).set(f.free_slots)
            m.rate.labels(model).set(f.tokens_per_s)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
