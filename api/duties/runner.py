"""Fleet-wide duties of the API processes (batch manager, reaper, reconciliation): each runs in every
API process, and a Redis lease lets one process at a time do its ticks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from api.duties.leader import Lease
from api.http.services import Services
from shared import aio

log = logging.getLogger(__name__)


class Duty(Protocol):
    name: str
    interval: float

    async def tick(self) -> None: ...


async def run_duty(services: Services, duty: Duty) -> None:
    lease = Lease(services.redis, duty.name, ttl_seconds=max(10.0, duty.interval * 5))
    failures = 0
    try:
        while True:
            try:
                if await lease.hold():
                    await duty.tick()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                # Redis or Postgres away: say so once, not on every tick.
                if failures == 1:
                    log.warning("%s: tick failed (%s: %s); retrying", duty.name, type(exc).__name__, exc)
                log.debug("%s tick failed", duty.name, exc_info=True)
            await asyncio.sleep(duty.interval)
    finally:
        with contextlib.suppress(Exception):
            await aio.wait_for(lease.release(), 1)
        close = getattr(duty, "aclose", None)  # a duty that holds a client (the webhook dispatcher)
        if close is not None:
            with contextlib.suppress(Exception):
                await aio.wait_for(close(), 1)
