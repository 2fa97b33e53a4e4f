"""ASGI middleware that refuses request bodies over the configured size with 413, before parsing them."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BODY_TOO_LARGE

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
            {
                "error": {
                    "message": BODY_TOO_LARGE.format(limit=limit),
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "payload_too_large",
                }
            }
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
