"""shared.aio.wait_for: a cancellation that meets a result in the same loop turn is never lost."""

from __future__ import annotations

import asyncio
import sys

import pytest

from shared import aio


async def _cancel_as_the_result_arrives(wait_for: object) -> asyncio.Task[object]:
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def waiter() -> object:
        return await wait_for(queue.get(), 10)  # type: ignore[operator]

    task = asyncio.create_task(waiter())
    for _ in range(3):
        await asyncio.sleep(0)  # the waiter is now blocked on the queue
    queue.put_nowait(1)  # the item and the cancellation land in the same loop turn
    task.cancel()
    await asyncio.wait([task])
    return task


async def test_aio_wait_for_keeps_a_cancellation_that_meets_a_result() -> None:
    task = await _cancel_as_the_result_arrives(aio.wait_for)
    assert task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in CPython 3.12 (gh-86296)")
async def test_asyncio_wait_for_on_311_loses_that_cancellation() -> None:
    # Why the helper exists, and why ruff bans asyncio.wait_for in the services: on 3.11 the task
    # returns the item as if nothing had cancelled it.
    task = await _cancel_as_the_result_arrives(asyncio.wait_for)
    assert not task.cancelled() and task.result() == 1


async def test_aio_wait_for_times_out_and_returns_results() -> None:
    assert await aio.wait_for(asyncio.sleep(0, "done"), 1) == "done"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await aio.wait_for(asyncio.Event().wait(), 0.05)
    assert loop.time() - t0 < 1
