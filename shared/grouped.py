"""Group commit: what concurrent callers hand in while one round trip is in flight goes out together
in the next one. The API's INSERTs, enqueues and reads of ended jobs, the embedding worker's claims,
result writes and cancel-flag reads: one statement or pipeline for many jobs.

Nothing waits for a group to fill: an item handed in while nothing is in flight goes out at once, so
a lone request pays no extra latency, and under load each round trip carries everything that arrived
during the previous one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Grouped(Generic[T, R]):
    """`await grouped(item)` runs `run([..., item, ...])` with whatever else is waiting, and returns
    item's own result (or raises its own exception: `run` returns one outcome per item, in order)."""

    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]], *, max_items: int = 256
    ) -> None:
        self._run = run
        self._max = max_items
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="inferq-grouped")
        return await future

    async def _drain(self) -> None:
        while self._pending:
            group = self._pending[: self._max]
            del self._pending[: self._max]
            try:
                outcomes: Sequence[R | BaseException] = await self._run([item for item, _ in group])
            except asyncio.CancelledError as exc:
                self._settle(group, [exc] * len(group))
                for _, future in self._pending:
                    future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                outcomes = [exc] * len(group)
            self._settle(group, outcomes)

    @staticmethod
    def _settle(group: list[tuple[T, asyncio.Future[R]]], outcomes: Sequence[R | BaseException]) -> None:
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue  # its caller went away
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
