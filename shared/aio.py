"""asyncio helpers that every process uses in place of the standard library's riskier ones."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for`, without its Python 3.11 habit of swallowing a cancellation.

    On 3.11, when the task awaiting `asyncio.wait_for(fut, t)` is cancelled in the same loop turn as
    `fut` completes, wait_for returns fut's result and the cancellation is lost (CPython gh-86296,
    fixed in 3.12). An outer timeout then never fires: `Prefer: wait=1` on a job streaming tokens
    waited for the whole job, because the inner wait on the relay's queue kept getting a token just as
    the outer timeout cancelled it. `asyncio.timeout` runs the awaitable in the caller's own task and
    tells its own cancellation from anyone else's, so nothing is swallowed."""
    async with asyncio.timeout(timeout):
        return await awaitable
