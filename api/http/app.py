"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from api.batches.manager import BatchManager
from api.duties.reaper import Reaper
from api.duties.reconcile import Reconciler
from api.duties.retention import Retention
from api.duties.runner import Duty, run_duty
from api.http import errors, openapi
from api.http import metrics as api_metrics
from api.http.metrics import ApiMetrics, HttpMetrics
from api.http.requestid import HEADER as REQUEST_ID_HEADER
from api.http.requestid import RequestId
from api.http.services import open_services
from api.jobs.deadlines import Deadlines
from api.routes import (
    batches,
    embeddings,
    events,
    files,
    health,
    jobs,
    openai,
    responses,
    stats,
    webhooks,
    workers,
)
from api.tenancy.auth import authenticate
from api.tenancy.idempotency import HEADER as IDEMPOTENCY_HEADER
from api.tenancy.idempotency import REPLAYED_HEADER
from api.tenancy.limits import BodySizeLimit, NulGuard
from api.tenancy.ratelimit import HEADER_NAMES as RATE_LIMIT_HEADERS
from api.tenancy.ratelimit import RateLimitHeaders
from api.ui import console
from api.webhooks.dispatcher import WebhookDispatcher
from shared import __version__
from shared.browser import AUTHORIZATION, CONTENT_TYPE, LAST_EVENT_ID, LOCATION
from shared.headers import PREFER, PREFERENCE_APPLIED, RETRY_AFTER
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
    app.add_middleware(RequestId)  # every response and log line of a request has its id
    if settings.cors_origins:
        _add_cors(app, settings.cors_origins)
    app.include_router(health.router)  # open: probes and scrapers carry no key
    app.include_router(api_metrics.router)
    console.install(app)  # open: a page load carries no key; the page asks for one
    secured = [Depends(authenticate)]
    for module in (jobs, openai, embeddings, responses, files, batches, webhooks, workers, stats):
        app.include_router(module.router, dependencies=secured)
    # Its routes check who asks themselves: the events route also takes a stream token (EventSource).
    app.include_router(events.router)
    openapi.install(app)
    return app


def _add_cors(app: FastAPI, origins: list[str]) -> None:
    """Outermost, so that every answer (a 401, a 429, a stream) carries the headers a browser needs to
    hand it to the page. No cookies are involved (keys travel in Authorization), hence no credentials."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=[AUTHORIZATION, CONTENT_TYPE, LAST_EVENT_ID, IDEMPOTENCY_HEADER, PREFER],
        expose_headers=[
            RETRY_AFTER,
            REQUEST_ID_HEADER,
            LOCATION,
            PREFERENCE_APPLIED,
            REPLAYED_HEADER,
            *RATE_LIMIT_HEADERS,
        ],
        max_age=600,
    )
