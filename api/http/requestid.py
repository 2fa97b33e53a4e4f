"""Every request gets an `x-request-id` (the client's, when it sends a sane one), on its response, in
its error body, in the job it creates, and in every log line written while it is served."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import logs

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _from_client(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == HEADER.encode():
            text = value.decode("latin-1")
            return text if _SANE.fullmatch(text) else None
    return None


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _from_client(scope) or "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        # Not reset afterwards: uvicorn runs each request in a task of its own, and the 500 handler
        # (outside this middleware) still needs the id.
        logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
