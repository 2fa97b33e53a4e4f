"""Batches the worker's events: everything emitted during one engine step goes to Redis in one round trip."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from shared.events import EventType, EventWriter

log = logging.getLogger(__name__)

_Item = tuple[str, EventType, dict[str, Any]]


class EventBatcher:
    def __init__(self, writer: EventWriter) -> None:
        self._writer = writer
        self._pending: list[_Item | asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-event-batcher")

    async def stop(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def emit(self, job_id: str, event: EventType, data: dict[str, Any]) -> None:
        self._pending.append((job_id, event, data))
        self._wake.set()

    async def flush(self) -> None:
        """Return once every event emitted before this call is in Redis."""
        if not self._pending:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(done)
        self._wake.set()
        await done

    async def _run(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            items = [b for b in batch if not isinstance(b, asyncio.Future)]
            try:
                await self._writer.publish_many(items)
                delay = 0.05
            except (RedisError, OSError) as exc:
                # Keep the events, in order, and try again: listeners resync from the stream.
                log.warning("publishing %d events failed (%s); retrying in %.2fs", len(items), exc, delay)
                self._pending = batch + self._pending
                self._wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for b in batch:
                if isinstance(b, asyncio.Future) and not b.done():
                    b.set_result(None)
