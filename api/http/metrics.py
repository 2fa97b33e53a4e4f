"""The API's Prometheus metrics at `GET /metrics`: HTTP requests by route and status, and the queue and
fleet figures (jobs waiting per queue, running, live workers, fleet rate and free slots), read from
Postgres and the worker registry at scrape time. Per-job latencies and token counts come from each
worker's own `/metrics` (`inferq worker --metrics-port`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import APIRouter
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
from api.http.services import Services
from shared.fleet import live_workers
from shared.models import Job
from shared.states import JobStatus

_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiMetrics:
    def __init__(self) -> None:
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
    """Jobs waiting (per lane) and running from Postgres, and the live workers' figures from the registry,
    per model: every configured model, and any other that has jobs or workers."""
    async with services.sessions() as session:
        rows = (
            await session.execute(
                select(Job.model, Job.status, Job.batch_id.is_(None), func.count())
                .where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
                .group_by(Job.model, Job.status, Job.batch_id.is_(None))
            )
        ).all()
    figures = {model: ModelFigures() for model in services.models}
    for model, status, interactive, count in rows:
        f = figures.setdefault(model, ModelFigures())
        if status == JobStatus.QUEUED.value:
            f.waiting[LANES[0] if interactive else LANES[1]] += count
        else:
            f.running += count
    for w in await live_workers(services.redis):
        f = figures.setdefault(str(w.get("model") or ""), ModelFigures())
        capacity = int(w.get("capacity") or 0)
        f.workers += 1
        f.capacity += capacity
        f.free_slots += max(0, capacity - int(w.get("running") or 0))
        f.tokens_per_s += float(w.get("tokens_per_s") or 0)
    return figures


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
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
