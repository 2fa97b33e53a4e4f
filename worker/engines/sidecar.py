"""A server that runs beside the worker under its platform's care (INFERQ_WORKER__UPSTREAM_SIDECAR): a
Kubernetes sidecar container in the worker's pod, a Compose service. The platform starts it and restarts
it; the worker only waits for it at start, with a progress line while it loads its model, and treats a
lost stream as a server coming back (the job goes back to the queue) rather than as the job's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

from shared import aio
from worker.engines.http import HttpEngine

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0
POLL_SECONDS = 0.5
NOT_UP = (
    "{engine}: the server at {url} did not answer within {seconds:.0f}s; see its container's log (is its "
    "model one it can load?), or raise INFERQ_WORKER__VLLM_START_SECONDS for a slower start"
)


class SidecarNotUp(RuntimeError):
    """A one-line error that says what to do."""


async def wait_until_up(engine: HttpEngine, seconds: float) -> None:
    """Return once `engine.health_url` answers 200; SidecarNotUp, one line, after `seconds`."""
    url = engine.health_url
    t0 = last = time.monotonic()
    log.info("%s: waiting for the server at %s (a sidecar; up to %.0fs)", engine.name, url, seconds)
    while True:
        status: int | str = "no answer"
        with contextlib.suppress(httpx.HTTPError, TimeoutError):
            status = (await aio.wait_for(engine.client.get(url), 5)).status_code
        if status == 200:
            log.info("%s: the server at %s answers after %.0fs", engine.name, url, time.monotonic() - t0)
            return
        now = time.monotonic()
        if now - t0 > seconds:
            raise SidecarNotUp(NOT_UP.format(engine=engine.name, url=url, seconds=seconds))
        if now - last >= PROGRESS_SECONDS:
            last = now
            log.info("%s: still waiting for %s (%.0fs; %s)", engine.name, url, now - t0, status)
        await asyncio.sleep(POLL_SECONDS)
