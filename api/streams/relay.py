"""One Redis pub/sub connection per API process, shared by every SSE stream it serves.

Streams subscribe to their job's live channel here (the first listener of a job subscribes the
channel, the last one unsubscribes it) and get the raw events on an asyncio queue. `subscribe`
returns only once Redis has confirmed the subscription, so a stream that then reads the job's
backlog cannot miss an event published in between. If the connection drops, the hub reconnects,
re-subscribes every channel, and puts RESYNC on each queue so that its stream re-reads the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from shared import aio, keys
from shared.events import Event

log = logging.getLogger(__name__)

RESYNC = object()


@dataclass(eq=False)
class Subscription:
    job_id: str
    queue: asyncio.Queue[Event | object] = field(default_factory=asyncio.Queue)


class Listeners:
    """What every relay hub keeps: which streams listen to which live channel, the wait for Redis to
    confirm a channel's subscription, and the channels whose streams must re-read their backlog. A hub
    says how a channel is subscribed (`_listen`, on its first listener) and unsubscribed (`_unlisten`,
    after its last one left), both called with the lock held."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._resync: set[str] = set()
        self.connected = asyncio.Event()

    @property
    def channels(self) -> int:
        return len(self._subs)

    def _confirm(self, channel: str) -> None:
        """Redis confirmed `channel`'s subscription: its waiting subscribers go on, and streams that
        must re-read their backlog are told to."""
        ev = self._confirmed.get(channel)
        if ev is not None:
            ev.set()
        if channel in self._resync:
            self._resync.discard(channel)
            for sub in self._subs.get(channel, ()):
                sub.queue.put_nowait(RESYNC)

    def _deliver(self, channel: str, payload: bytes) -> None:
        subs = self._subs.get(channel)
        if subs:
            event = Event.from_message(payload)
            for sub in subs:
                sub.queue.put_nowait(event)

    async def _listen(self, channel: str) -> None:
        raise NotImplementedError

    async def _unlisten(self, channel: str) -> None:
        raise NotImplementedError

    async def subscribe(self, job_id: str, timeout: float = 5.0) -> Subscription:
        sub = Subscription(job_id)
        channel = keys.live_channel(job_id)
        async with self._lock:
            first = channel not in self._subs
            self._subs.setdefault(channel, set()).add(sub)
            if first:
                self._confirmed[channel] = asyncio.Event()
                await self._listen(channel)
            confirmed = self._confirmed[channel]
        try:
            await aio.wait_for(confirmed.wait(), timeout)
        except TimeoutError:
            await self.unsubscribe(sub)
            raise ConnectionError("redis did not confirm the subscription") from None
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        channel = keys.live_channel(sub.job_id)
        async with self._lock:
            subs = self._subs.get(channel)
            if subs is None:
                return
            subs.discard(sub)
            if subs:
                return
            del self._subs[channel]
            self._confirmed.pop(channel, None)
            self._resync.discard(channel)
            await self._unlisten(channel)


class RelayHub(Listeners):
    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        # Always subscribed to something, so the reader never idles on an empty subscription set.
        self._home = keys.relay_home(os.getpid(), id(self))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_pubsub()

    async def _listen(self, channel: str) -> None:
        if self._pubsub is not None and self.connected.is_set():
            await self._pubsub.subscribe(channel)

    async def _unlisten(self, channel: str) -> None:
        if self._pubsub is not None and self.connected.is_set():
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None

    async def _connect(self) -> None:
        async with self._lock:
            await self._close_pubsub()
            self._pubsub = self._redis.pubsub()
            for ev in self._confirmed.values():
                ev.clear()
            await self._pubsub.subscribe(self._home, *self._subs.keys())
            self.connected.set()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._connect()
                delay = 0.1
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                log.warning("relay lost its Redis pub/sub connection (%s); reconnecting", exc)
                self._resync = set(self._subs)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _read(self) -> None:
        assert self._pubsub is not None
        pubsub = self._pubsub
        while True:
            message = await pubsub.get_message(timeout=5.0)
            if message is None:
                continue
            kind = message.get("type")
            channel = message["channel"].decode()
            if kind == "subscribe":
                self._confirm(channel)
            elif kind == "message":
                self._deliver(channel, message["data"])
