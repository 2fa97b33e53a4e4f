"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import errors
from api.batches.manager import BatchManager
from api.limits import BodySizeLimit
from api.routes import batches, events, files, health, jobs, openai
from api.services import open_services
from shared import __version__
from shared.schemas import ErrorResponse
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_services(settings) as services:
            manager = BatchManager(services)
            task = asyncio.create_task(manager.run(), name="inferq-batch-manager")
            try:
                yield {"services": services}
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await manager.stop()

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
    return app
