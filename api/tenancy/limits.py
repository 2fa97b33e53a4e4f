"""ASGI middleware that refuses request bodies over the configured size with 413, before parsing them."""

from __future__ import annotations

import json
import re
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.errors import BODY_TOO_LARGE, NUL_CHARACTER, error_body

# Up to this many bytes, an oversized body is read and dropped before the 413 goes out, so that the
# client sees the answer instead of a connection reset in the middle of its upload.
_DRAIN_LIMIT = 32 * 1024 * 1024


class _TooLarge(Exception):
    pass


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class _Body:
    """Counts what the app reads of the request body and stops it past the limit."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.received = 0
        self.done = False
        self.too_large = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request":
            self.done = True
            return message
        self.done = not message.get("more_body", False)
        self.received += len(message.get("body", b""))
        if self.received > self._limit:
            self.too_large = True
            raise _TooLarge
        return message

    async def drain(self) -> None:
        while not self.done and self.received <= _DRAIN_LIMIT:
            message = await self._receive()
            self.received += len(message.get("body", b""))
            self.done = message["type"] != "http.request" or not message.get("more_body", False)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = overrides or {}

    async def _reject(self, send: Send, limit: int) -> None:
        body = json.dumps(
            error_body(BODY_TOO_LARGE.format(limit=limit), "invalid_request_error", code="payload_too_large")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send(
            {"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]}
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(scope.get("path", ""), self.max_bytes)
        body = _Body(receive, limit)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            body.received = declared if declared > _DRAIN_LIMIT else 0
            await body.drain()
            await self._reject(send, limit)
            return

        forwarded = False

        async def guarded_send(message: Message) -> None:
            nonlocal forwarded
            if body.too_large:
                return  # whatever the app made of the aborted body, the answer is 413
            forwarded = True
            await send(message)

        try:
            await self.app(scope, body.receive, guarded_send)
        except Exception:
            if not body.too_large:
                raise
        if body.too_large and not forwarded:
            await body.drain()
            await self._reject(send, limit)


# A JSON `\u0000` escape (not an escaped backslash followed by "u0000"): Postgres text cannot hold NUL.
_NUL_ESCAPE = re.compile(rb"(?:^|[^\\])(?:\\\\)*\\u0000")


def _nul_in_target(scope: Scope) -> bool:
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    return b"\x00" in unquote_to_bytes(raw) or b"%00" in scope.get("query_string", b"")


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return b"json" in value.lower()
    return False


class NulGuard:
    """400 for a NUL character in the URL or in a JSON body's strings, which no Postgres text column
    can store. Sits inside BodySizeLimit, so the JSON body it reads whole is already size-checked."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(NUL_CHARACTER, "invalid_request_error", code="invalid_characters")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _nul_in_target(scope):
            await self._refuse(send)
            return
        if not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left; let the app see it
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _NUL_ESCAPE.search(body):
            await self._refuse(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first or {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
