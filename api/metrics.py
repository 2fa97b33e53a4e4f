"""The API's Prometheus metrics at `GET /metrics`: HTTP requests by route and status, and the queue and
fleet figures (jobs waiting per queue, running, live workers, fleet rate and free slots), read from
Postgres and the worker registry at scrape time. Per-job latencies and token counts come from each
worker's own `/metrics` (`inferq worker --metrics-port`)."""

from __future__ import annotations

import time

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

from api.deps import ServicesDep
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


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(services: ServicesDep) -> Response:
    m = services.metrics
    async with services.sessions() as session:
        rows = (
            await session.execute(
                select(Job.model, Job.status, Job.batch_id.is_(None), func.count())
                .where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
                .group_by(Job.model, Job.status, Job.batch_id.is_(None))
            )
        ).all()
    m.waiting.clear()
    m.running.clear()
    for model in services.models:
        for queue in ("interactive", "batch"):
            m.waiting.labels(model, queue).set(0)
        m.running.labels(model).set(0)
    for model, status, interactive, count in rows:
        if status == JobStatus.QUEUED.value:
            m.waiting.labels(model, "interactive" if interactive else "batch").inc(count)
        else:
            m.running.labels(model).inc(count)
    for gauge in (m.workers, m.slots, m.rate):
        gauge.clear()
    for w in await live_workers(services.redis):
        name = str(w.get("model") or "")
        m.workers.labels(name).inc()
        m.slots.labels(name).inc(max(0, int(w.get("capacity") or 0) - int(w.get("running") or 0)))
        m.rate.labels(name).inc(float(w.get("tokens_per_s") or 0))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
