"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.http.deps import ServicesDep
from shared import aio

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT = 2.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and Postgres are reachable")
async def readyz(services: ServicesDep) -> JSONResponse:
    async def redis_ok() -> None:
        await services.redis.ping()

    async def db_ok() -> None:
        async with services.db.connect() as conn:
            await conn.execute(text("SELECT 1"))

    checks: dict[str, str] = {}
    for name, probe in (("redis", redis_ok), ("postgres", db_ok)):
        try:
            await aio.wait_for(probe(), _CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", **checks})
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    body = {
        "error": {
            "message": f"not ready: {failing} unreachable",
            "type": "service_unavailable_error",
            "param": None,
            "code": None,
        },
        **checks,
    }
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
