"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from api import errors, openapi
from api import metrics as api_metrics
from api.auth import authenticate
from api.batches.manager import BatchManager
from api.deadlines import Deadlines
from api.duties import Duty, run_duty
from api.limits import BodySizeLimit, NulGuard
from api.metrics import ApiMetrics, HttpMetrics
from api.ratelimit import RateLimitHeaders
from api.reaper import Reaper
from api.reconcile import Reconciler
from api.requestid import RequestId
from api.retention import Retention
from api.routes import batches, events, files, health, jobs, openai, responses, webhooks, workers
from api.services import open_services
from api.webhooks.dispatcher import WebhookDispatcher
from shared import __version__
from shared.runtime import freeze_startup_objects
from shared.schemas import ErrorResponse
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_services(settings, metrics) as services:
            duties: list[Duty] = [
                BatchManager(services),
                Reaper(services),
                Deadlines(services),
                Reconciler(services),
            ]
            if settings.retention.seconds is not None:  # off: leaves its lease to a process that has it on
                duties.append(Retention(services))
            if settings.webhooks.dispatch:
                duties.append(WebhookDispatcher(services))
            tasks = [asyncio.create_task(run_duty(services, d), name=f"inferq-{d.name}") for d in duties]
            freeze_startup_objects()
            try:
                yield {"services": services}
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="inferq",
        version=__version__,
        description="Queue-backed asynchronous LLM inference jobs with continuous batching and SSE streams.",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            429: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    errors.install(app)
    app.add_middleware(NulGuard)  # inside BodySizeLimit (added next): reads only size-checked bodies
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.limits.max_body_bytes,
        # Uploads may be far larger than a request body; room for the multipart framing too.
        overrides={"/v1/files": settings.batches.max_file_bytes + 1_000_000},
    )
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(RequestId)  # outermost: every response and log line of a request has its id
    app.include_router(health.router)  # open: probes and scrapers carry no key
    app.include_router(api_metrics.router)
    secured = [Depends(authenticate)]
    for module in (jobs, events, openai, responses, files, batches, webhooks, workers):
        app.include_router(module.router, dependencies=secured)
    openapi.install(app)
    return app
