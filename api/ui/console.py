"""Serves the web console: `GET /ui` is its page, `/ui/static/*` its scripts and styles, all shipped in
the package (no CDN: it works offline). The page holds no data; it reads the API with the user's key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from api.http.deps import ServicesDep
from shared import __version__
from shared.browser import UI_PATH

STATIC = Path(__file__).resolve().parent / "static"
# The console only ever talks to the API that serves it, and runs no inline code: a page injected
# into it (a job's output rendered by mistake) could neither run script nor send data elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get(UI_PATH)
async def console_root() -> RedirectResponse:
    # The page loads its modules by relative URL: it must be served from the folder, /ui/.
    return RedirectResponse(f"{UI_PATH}/", status_code=308)


@router.get(f"{UI_PATH}/")
async def console_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


@router.get(f"{UI_PATH}/config.json")
async def console_config(services: ServicesDep) -> JSONResponse:
    # Whether to ask for a key before the first call: probing a route instead would log its 401 as
    # an error in the browser's console.
    required = await services.auth.required()
    return JSONResponse({"auth_required": required, "version": __version__}, headers=_HEADERS)


class _Assets(StaticFiles):
    """The console's files, with its security headers (module scripts and styles need them too)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(_HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Open routes: a browser's page load carries no key; the page asks for one before reading data."""
    app.include_router(router)
    app.mount(f"{UI_PATH}/static", _Assets(directory=STATIC), name="ui-static")
