"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import errors
from api.batches.manager import BatchManager
from api.duties import Duty, run_duty
from api.limits import BodySizeLimit
from api.reaper import Reaper
from api.reconcile import Reconciler
from api.routes import batches, events, files, health, jobs, openai, workers
from api.services import open_services
from shared import __version__
from shared.schemas import ErrorResponse
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_services(settings) as services:
            duties: list[Duty] = [BatchManager(services), Reaper(services), Reconciler(services)]
            tasks = [asyncio.create_task(run_duty(services, d), name=f"inferq-{d.name}") for d in duties]
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
            404: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    errors.install(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.limits.max_body_bytes,
        # Uploads may be far larger than a request body; room for the multipart framing too.
        overrides={"/v1/files": settings.batches.max_file_bytes + 1_000_000},
    )
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(openai.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(workers.router)
    return app
