"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load generation.

httpx spends ~1 ms of CPU per request here, and with one pool shared by 64 concurrent clients ~15 ms
(its pool scans every connection on each request); on a 2-core machine the load generator would then
take the CPU the server under test needs. This client costs a small fraction of that: one connection
per virtual user, requests written as bytes, responses read by Content-Length or chunked encoding.
Enough for JSON requests and SSE streams against uvicorn; not a general-purpose client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit


class HTTPError(Exception):
    pass


class Connection:
    """One keep-alive connection to `base_url` (http only), reopened when the server closes it."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._hostport = f"{self.host}:{self.port}".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        self._reader = self._writer = None

    def _request_bytes(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self._hostport]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}".encode())
        if body is not None:
            lines.append(b"Content-Type: application/json")
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    async def _head(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> tuple[asyncio.StreamReader, int, dict[str, str]]:
        for attempt in range(2):
            reader, writer = await self._open()
            try:
                writer.write(self._request_bytes(method, path, body, headers))
                status, head = await self._head(reader)
                return reader, status, head
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()  # a keep-alive connection the server had closed: retry once on a new one
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def request(
        self, method: str, path: str, *, json_body: Any = None, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send one request and read the whole response: (status, body)."""
        payload = json.dumps(json_body).encode() if json_body is not None else body
        reader, status, head = await self._send(method, path, payload, None)
        if head.get("transfer-encoding", "").lower() == "chunked":
            data = b"".join([chunk async for chunk in self._chunks(reader)])
        else:
            data = await reader.readexactly(int(head.get("content-length", "0")))
        if head.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def stream_lines(
        self, method: str, path: str, *, json_body: Any = None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Send one request and yield (status, line) for each line of a streamed (chunked) body. The
        connection is closed afterwards unless the body was read to its end."""
        payload = json.dumps(json_body).encode() if json_body is not None else None
        reader, status, head = await self._send(method, path, payload, headers)
        finished = False
        try:
            if head.get("transfer-encoding", "").lower() != "chunked":
                data = await reader.readexactly(int(head.get("content-length", "0")))
                for line in data.split(b"\n"):
                    yield status, line.rstrip(b"\r")
                finished = True
                return
            pending = b""
            async for chunk in self._chunks(reader):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield status, line.rstrip(b"\r")
            if pending:
                yield status, pending
            finished = True
        finally:
            if not finished:
                await self.close()
