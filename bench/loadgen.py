"""A closed-loop HTTP load generator: N virtual users send the same request back to back for a fixed
time; throughput is the completions inside the measured window, latency is per request.

Clients: `raw` (default; bench.rawhttp, one keep-alive connection per user, cheapest on CPU), `httpx`
(one httpx.AsyncClient per user), `httpx-shared` (one AsyncClient, one pool shared by all users; its
pool bookkeeping costs ~15 ms of CPU per request at 64 connections on this machine, see RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from bench.rawhttp import Connection
from bench.stats import summarize

CLIENTS = ("raw", "httpx", "httpx-shared")
T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json_body: Any = None
    expect: int = 200


@dataclass
class LoadResult:
    client: str
    concurrency: int
    seconds: float
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "ok": self.ok,
            "errors": self.errors,
            "req_per_s": round(self.rate, 1),
            "latency_ms": summarize(self.latencies_ms),
            "error_samples": self.error_samples[:5],
        }


Send = Callable[[], Awaitable[tuple[int, bytes]]]


@contextlib.asynccontextmanager
async def _senders(base_url: str, call: Call, client: str, n: int) -> AsyncIterator[list[Send]]:
    """One `send()` per virtual user, each bound to its connection(s)."""
    body = json.dumps(call.json_body).encode() if call.json_body is not None else None
    if client == "raw":
        conns = [Connection(base_url) for _ in range(n)]

        def raw(c: Connection) -> Send:
            return lambda: c.request(call.method, call.path, body=body)

        try:
            yield [raw(c) for c in conns]
        finally:
            for c in conns:
                await c.close()
        return
    if client not in ("httpx", "httpx-shared"):
        raise ValueError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")
    pools = 1 if client == "httpx-shared" else n
    limits = httpx.Limits(max_connections=n if pools == 1 else 1)
    headers = {"content-type": "application/json"}
    clients = [httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0) for _ in range(pools)]

    def via(h: httpx.AsyncClient) -> Send:
        async def send() -> tuple[int, bytes]:
            r = await h.request(call.method, call.path, content=body, headers=headers)
            return r.status_code, r.content

        return send

    try:
        yield [via(clients[i % pools]) for i in range(n)]
    finally:
        for h in clients:
            await h.aclose()


async def run_for(
    base_url: str, call: Call, *, concurrency: int, seconds: float, warmup: float = 0.0, client: str = "raw"
) -> LoadResult:
    """`concurrency` users sending `call` for `warmup` + `seconds` seconds; the requests that complete
    inside the measured window count (rate = completions / window)."""
    result = LoadResult(client, concurrency, seconds)
    async with _senders(base_url, call, client, concurrency) as senders:
        start = time.perf_counter() + warmup
        end = start + seconds

        async def user(send: Send) -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                err = None
                try:
                    status, data = await send()
                    if status != call.expect:
                        err = f"HTTP {status}: {data[:200]!r}"
                except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
                    err = f"{type(exc).__name__}: {exc}"
                t1 = time.perf_counter()
                if not start <= t1 < end:
                    continue
                if err is None:
                    result.ok += 1
                    result.latencies_ms.append((t1 - t0) * 1000)
                else:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(err)

        await asyncio.gather(*(user(s) for s in senders))
    return result


async def closed_loop(
    base_url: str, concurrency: int, requests: int, one: Callable[[Connection, int], Awaitable[T]]
) -> tuple[list[T], float]:
    """`requests` calls `one(connection, i)` (i = 0 .. requests - 1), `concurrency` keep-alive
    connections each making one call at a time (a closed loop); the results in order of i, and the
    seconds from the first call to the last result."""
    results: list[T | None] = [None] * requests
    next_index = 0
    conns = [Connection(base_url) for _ in range(concurrency)]

    async def user(conn: Connection) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            results[i] = await one(conn, i)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(user(c) for c in conns))
    finally:
        elapsed = time.perf_counter() - t0
        for c in conns:
            await c.close()
    return [r for r in results if r is not None], elapsed
