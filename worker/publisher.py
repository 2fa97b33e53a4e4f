"""Batches the worker's events: everything emitted during one engine step goes to Redis in one round trip
per shard (one in all on a plain Redis).

Each job's events wait in a lane of their own, in order. A send takes every waiting lane of one shard;
a shard whose send fails (away, restarting, failing over) holds back only the lanes of its jobs, which
are tried again with backoff, while the other shards' events go on as before.

With a coalescing window (`INFERQ_EVENTS__COALESCE_MS`, off by default), a job's token event waits up to
that long for the job's next tokens and takes them in: one event (one script call, one message to each
listener) for several engine steps. The text a client gets is the same; the number of token events
is not, which is why it is off unless asked for. Token indexes stay consecutive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import aio
from shared.eventredis import REDIRECTS
from shared.events import CHOICE, FENCED, EventType, EventWriter, Item
from shared.logprobs import LOGPROBS

log = logging.getLogger(__name__)

_FIRST_DELAY = 0.05
_MAX_DELAY = 2.0


@dataclass(eq=False)
class _Lane:
    job_id: str
    items: deque[Item] = field(default_factory=deque)
    emitted: int = 0  # events ever put in this lane
    written: int = 0  # of them, in Redis
    sending: int = 0  # of its items, how many the send in flight took (0: none in flight)
    retry_at: float = 0.0
    delay: float = _FIRST_DELAY
    hold_until: float = 0.0  # its last item, a token event, may take in more tokens until then

    def tail_open(self, now: float) -> bool:
        """Whether its last item is a token event that may still take in tokens."""
        return len(self.items) > self.sending and self.items[-1][1] == "token" and now < self.hold_until


@dataclass(eq=False)
class _Waiter:
    targets: list[tuple[_Lane, int]]
    future: asyncio.Future[None]

    def ready(self) -> bool:
        return all(lane.written >= n for lane, n in self.targets)


def _joined(tail: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive token events of one output as one: the text, and the logprobs of both."""
    joined = {**tail, "text": str(tail["text"]) + str(data["text"])}
    if LOGPROBS in tail or LOGPROBS in data:
        joined[LOGPROBS] = [*tail.get(LOGPROBS, ()), *data.get(LOGPROBS, ())]
    return joined


class EventBatcher:
    def __init__(self, writer: EventWriter, *, coalesce_seconds: float = 0.0) -> None:
        self._writer = writer
        self._coalesce = coalesce_seconds
        # Called with (job, attempt) whose events Redis dropped: a newer attempt owns the job, or it ended.
        self.on_fenced: Callable[[str, int], None] | None = None
        self._merged: dict[str, int] = {}  # per job: token events taken into an earlier one (index shift)
        self._lanes: dict[str, _Lane] = {}
        self._busy: set[str] = set()  # shards with a send in flight: one at a time each, in order
        self._waiters: list[_Waiter] = []
        self._sends: set[asyncio.Task[None]] = set()
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
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        await self._writer.aclose()

    def emit(self, job_id: str, event: EventType, data: dict[str, Any], *, attempt: int = 0) -> None:
        """Queue one event of the job's attempt `attempt` (0: of no attempt). Once Redis has seen a newer
        attempt's events, or the job's end, an attempt's events are dropped (shared.events._FENCE_LUA)
        and `on_fenced` is told."""
        lane = self._lanes.get(job_id)
        if lane is None:
            lane = self._lanes[job_id] = _Lane(job_id)
        if self._coalesce and event == "token":
            now = asyncio.get_running_loop().time()
            if lane.tail_open(now) and lane.items[-1][2].get(CHOICE) == data.get(CHOICE):
                lane.items[-1] = (job_id, "token", _joined(lane.items[-1][2], data), lane.items[-1][3])
                self._merged[job_id] = self._merged.get(job_id, 0) + 1
                return
            shift = self._merged.get(job_id)
            if shift:
                data = {**data, "index": int(data["index"]) - shift}
            lane.hold_until = now + self._coalesce
        elif event != "token":
            # A new attempt numbers its tokens on from what its stream holds; an ended job has no more.
            self._merged.pop(job_id, None)
        lane.items.append((job_id, event, data, attempt))
        lane.emitted += 1
        self._wake.set()

    async def flush(self, job_id: str | None = None) -> None:
        """Return once every event emitted before this call (of `job_id`, or of every job) is in
        Redis. A job's flush waits for its own shard only."""
        lanes = (
            [self._lanes[job_id]] if job_id in self._lanes else [] if job_id else list(self._lanes.values())
        )
        waiter = _Waiter([(lane, lane.emitted) for lane in lanes], asyncio.get_running_loop().create_future())
        if waiter.ready():
            return
        self._waiters.append(waiter)
        self._wake.set()
        await asyncio.shield(waiter.future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = loop.time()
            next_retry: float | None = None
            ready: dict[str, list[_Lane]] = {}
            for lane in self._lanes.values():
                if lane.sending or not lane.items:
                    continue
                due = lane.retry_at
                if self._coalesce and lane.tail_open(now) and not self._awaited(lane):
                    due = max(due, lane.hold_until)
                if due > now:
                    next_retry = due if next_retry is None else min(next_retry, due)
                    continue
                route = self._writer.route(lane.job_id)
                if route not in self._busy:
                    ready.setdefault(route, []).append(lane)
            for route, lanes in ready.items():
                self._busy.add(route)
                for lane in lanes:
                    lane.sending = len(lane.items)
                task = asyncio.create_task(self._send(route, lanes), name="inferq-event-send")
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
            timeout = None if next_retry is None else max(next_retry - now, 0.001)
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._wake.wait(), timeout)

    async def _send(self, route: str, lanes: list[_Lane]) -> None:
        batch = [(lane, list(lane.items)) for lane in lanes]
        items = [item for _, taken in batch for item in taken]
        try:
            results: list[Any] = await self._writer.publish_each(items)
        except Exception as exc:  # the writer reports errors per item; this is anything else
            results = [exc] * len(items)
        now = asyncio.get_running_loop().time()
        failed: list[tuple[_Lane, BaseException]] = []
        fenced: set[tuple[str, int]] = set()
        pos = 0
        for lane, taken in batch:
            mine = results[pos : pos + len(taken)]
            pos += len(taken)
            ok = next((i for i, r in enumerate(mine) if isinstance(r, BaseException)), len(mine))
            for r in mine[:ok]:
                item = lane.items.popleft()
                if r == FENCED:
                    fenced.add((lane.job_id, item[3]))
            lane.written += ok
            lane.sending = 0
            if ok < len(mine):
                # Keep its events, in order, and try again: listeners resync from the stream.
                failed.append((lane, mine[ok]))
                lane.retry_at = now + lane.delay
                lane.delay = min(lane.delay * 2, _MAX_DELAY)
            else:
                lane.delay = _FIRST_DELAY
                if not lane.items and self._lanes.get(lane.job_id) is lane:
                    del self._lanes[lane.job_id]
        if failed and all(isinstance(e, REDIRECTS) for _, e in failed):
            # A slot still moving after the writer's own redirects: expected, and over in moments.
            log.info("events of %d job(s) wait for their slot to settle; retrying", len(failed))
        elif failed:
            first, error = failed[0]
            log.warning(
                "publishing events of %d job(s)%s failed (%s); retrying in %.2fs",
                len(failed),
                f" to {route}" if route else "",
                error,
                first.retry_at - now,
            )
        for job_id, attempt in fenced:
            log.warning(
                "job %s attempt %d: its events were dropped (a newer attempt runs it, or it ended)",
                job_id,
                attempt,
            )
            if self.on_fenced is not None:
                self.on_fenced(job_id, attempt)
        self._busy.discard(route)
        self._resolve()
        self._wake.set()

    def _awaited(self, lane: _Lane) -> bool:
        """Whether a flush waits for this lane: it goes out at once, window or not."""
        return any(target is lane for w in self._waiters for target, _ in w.targets)

    def _resolve(self) -> None:
        still = []
        for waiter in self._waiters:
            if waiter.ready():
                if not waiter.future.done():
                    waiter.future.set_result(None)
            else:
                still.append(waiter)
        self._waiters = still
