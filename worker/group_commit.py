"""Group commit: calls that arrive while one round runs wait and go together in the next round, so that
many jobs share one Postgres statement under load while a lone job waits for nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")


class GroupCommit(Generic[A, R]):
    """`await group(item)` is `run([item, ...])`'s result for that item, where `run` takes every item
    that arrived while the previous round ran (at most `max_items`), and returns one result per item
    in order. An exception of a round is every one of its callers' exception."""

    def __init__(self, run: Callable[[list[A]], Awaitable[list[R]]], max_items: int = 512) -> None:
        self._run = run
        self._max = max_items
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._rounds(), name="inferq-group-commit")
        return await future

    async def _rounds(self) -> None:
        while self._pending:
            group, self._pending = self._pending[: self._max], self._pending[self._max :]
            try:
                results = await self._run([item for item, _ in group])
            except asyncio.CancelledError:
                for _, future in group + self._pending:
                    future.cancel()
                self._pending = []
                raise
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(group, results, strict=True):
                if not future.done():  # its caller was cancelled meanwhile
                    future.set_result(result)
