"""The relay on a Redis Cluster: one sharded pub/sub connection (`SSUBSCRIBE`) per shard that holds a
channel some stream of this API process listens to, shared by all of them.

redis-py (5.x, the line arq allows) has no sharded pub/sub on its asyncio cluster client, so this keeps
its own connection per shard, made with the cluster client's settings and routed by its slot map. A
channel whose slot is not (or no longer) on the shard it was sent to (a `MOVED` reply, or the server
unsubscribing it when its slot moves or its node becomes a replica), and every channel of a shard whose
connection breaks, is placed again from a fresh slot map; once its new subscription is confirmed its
streams get RESYNC and re-read their backlog, which covers the events published in between. Redirects
are expected here and handled; they are never logged as errors nor reach a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from redis.asyncio import RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

from api.streams.relay import Listeners
from shared.eventredis import REDIRECTS, ClusterTopology, new_connection

log = logging.getLogger(__name__)

# A quiet connection is pinged this often; one that leaves a ping unanswered this long is given up.
PING_SECONDS = 5.0


@dataclass(eq=False)
class _Shard:
    name: str
    conn: Connection
    channels: set[str] = field(default_factory=set)  # subscribed here, or asked to be
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader: asyncio.Task[None] | None = None


class ShardedRelayHub(Listeners):
    def __init__(self, cluster: RedisCluster) -> None:
        super().__init__()
        self._topology = ClusterTopology(cluster)
        self._shards: dict[str, _Shard] = {}
        self._where: dict[str, _Shard] = {}  # channel -> the shard it is subscribed (or asked) on
        self._homeless: set[str] = set()  # channels to place (again) on their shard
        self._placing = asyncio.Event()
        self._placer: asyncio.Task[None] | None = None
        self._stale = False  # the slot map needs looking up before the next placing

    @property
    def shards(self) -> int:
        """Sharded pub/sub connections open now."""
        return len(self._shards)

    async def start(self) -> None:
        self._placer = asyncio.create_task(self._place_loop(), name="inferq-relay-placer")
        self.connected.set()

    async def stop(self) -> None:
        tasks = [t for t in [self._placer, *(s.reader for s in self._shards.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in list(self._shards.values()):
            with contextlib.suppress(Exception):
                await shard.conn.disconnect()
        self._shards.clear()

    async def _listen(self, channel: str) -> None:
        await self._place(channel)

    async def _unlisten(self, channel: str) -> None:
        self._homeless.discard(channel)
        shard = self._where.pop(channel, None)
        if shard is not None:
            shard.channels.discard(channel)
            with contextlib.suppress(Exception):
                async with shard.lock:
                    await shard.conn.send_command("SUNSUBSCRIBE", channel)

    # Placing channels on shards (called with self._lock held, or from the placer).

    async def _place(self, channel: str) -> None:
        """Ask the shard that holds `channel` to subscribe it; on failure leave it to the placer."""
        try:
            shard = await self._shard_for(channel)
            shard.channels.add(channel)
            self._where[channel] = shard
            async with shard.lock:
                await shard.conn.send_command("SSUBSCRIBE", channel)
        except Exception as exc:
            log.debug("subscribing %s failed (%s); placing it again", channel, exc)
            self._unplace(channel)
            self._homeless.add(channel)
            self._placing.set()

    def _unplace(self, channel: str) -> None:
        shard = self._where.pop(channel, None)
        if shard is not None:
            shard.channels.discard(channel)

    async def _shard_for(self, channel: str) -> _Shard:
        node = self._topology.node(channel)
        shard = self._shards.get(node.name)
        if shard is None:
            conn = new_connection(node)
            await conn.connect()  # type: ignore[no-untyped-call]
            shard = _Shard(node.name, conn)
            self._shards[node.name] = shard
            shard.reader = asyncio.create_task(self._read(shard), name=f"inferq-relay-{node.name}")
        return shard

    def _rehome(self, channels: set[str], *, refresh: bool) -> None:
        """These channels lost (or never got) their subscription: place them again, then resync."""
        for channel in channels:
            if channel not in self._subs:
                continue
            self._unplace(channel)
            ev = self._confirmed.get(channel)
            if ev is not None and ev.is_set():
                self._resync.add(channel)  # it had been live: events may have gone by unseen
            self._homeless.add(channel)
        if refresh:
            self._stale = True
        self._placing.set()

    async def _place_loop(self) -> None:
        delay = 0.1
        while True:
            await self._placing.wait()
            self._placing.clear()
            if self._stale:
                self._stale = False
                await self._topology.refresh()
            async with self._lock:
                todo, self._homeless = self._homeless, set()
                for channel in todo:
                    if channel in self._subs:
                        await self._place(channel)
                left = bool(self._homeless)
            if left:
                # A shard that is away (restarting, failing over): look the slots up again, slowly.
                self._stale = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                self._placing.set()
            else:
                delay = 0.1

    # Reading one shard's connection.

    async def _read(self, shard: _Shard) -> None:
        pinged = False
        try:
            while True:
                try:
                    reply = await shard.conn.read_response(timeout=PING_SECONDS)
                except REDIRECTS as exc:
                    # The slot of a channel asked for here is on another shard now.
                    self._redirected(shard, exc)
                    continue
                except ResponseError as exc:
                    log.warning("relay shard %s refused a subscription: %s", shard.name, exc)
                    continue
                if reply is None:
                    if pinged:
                        raise ConnectionError(f"no reply to a ping in {2 * PING_SECONDS:.0f}s")
                    async with shard.lock:
                        await shard.conn.send_command("PING")
                    pinged = True
                    continue
                pinged = False
                self._on_reply(shard, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("relay lost its connection to shard %s (%s); subscribing again", shard.name, exc)
            self._drop(shard)

    def _drop(self, shard: _Shard) -> None:
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        asyncio.get_running_loop().create_task(shard.conn.disconnect())
        self._rehome(set(shard.channels), refresh=True)

    def _redirected(self, shard: _Shard, exc: Exception) -> None:
        slot = getattr(exc, "slot_id", None)
        moved = {c for c in shard.channels if slot is None or self._topology.cluster.keyslot(c) == slot}
        self._rehome(moved, refresh=True)

    def _on_reply(self, shard: _Shard, reply: object) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # a pong
        kind, raw_channel, payload = reply[0], reply[1], reply[2]
        channel = raw_channel.decode() if isinstance(raw_channel, bytes) else str(raw_channel)
        if kind == b"smessage":
            if self._where.get(channel) is shard:
                self._deliver(channel, payload)
        elif kind == b"ssubscribe":
            if self._where.get(channel) is not shard:
                return  # placed elsewhere since; that shard's confirmation counts
            self._confirm(channel)
        elif kind == b"sunsubscribe" and self._where.get(channel) is shard and channel in self._subs:
            # Not asked for: the server dropped it (its slot moved away, or this node is a replica now).
            self._rehome({channel}, refresh=True)
