"""The Redis that carries job events (streams, live channels, cancel flags): the queue's own Redis by
default, or a Redis / Valkey Cluster of many shards (`INFERQ_EVENTS__REDIS_URL`).

On a cluster, every per-job key is under the job's `{job_id}` tag, so each job lives on one shard and a
shard is only ever asked about its own jobs. Writes and sharded subscriptions go over connections of our
own, one per shard (`NodeLinks`, the API's sharded relay), routed by the cluster client's slot map
(`ClusterTopology`): redis-py's cluster pipeline, on a connection error to one node, closes the
connections to every node and retries, which would repeat events already written on healthy shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Literal

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, MovedError, ResponseError, TryAgainError

from shared import keys

EventsRedis = Redis | RedisCluster
ClusterMode = Literal["auto", "on", "off"]

# Replies that mean "this node does not hold the slot (now)": the command did not run there.
REDIRECTS = (MovedError, AskError, TryAgainError)

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 2.0
# Long enough for the largest XRANGE of a stream, short enough that a node that stops answering (a
# network partition rather than a refused connection) is given up on and its topology looked up again.
_SOCKET_TIMEOUT = 10.0
_REFRESH_MIN_INTERVAL = 0.2


async def is_cluster(url: str) -> bool:
    """Whether the server at `url` runs in cluster mode (`INFO cluster`)."""
    probe = Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT)
    try:
        info = await probe.info("cluster")
        return bool(int(info.get("cluster_enabled", 0)))
    finally:
        await probe.aclose()


async def connect_events(url: str, mode: ClusterMode, queue: Redis | None) -> tuple[EventsRedis, bool]:
    """The events client for `url`, and whether the caller owns it (closes it). `queue` is the queue's
    own client when `url` is the queue's URL: on a plain Redis it is used as it is, unchanged."""
    cluster = mode == "on" or (mode == "auto" and await is_cluster(url))
    if not cluster:
        if queue is not None:
            return queue, False
        return Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT), True
    client = RedisCluster.from_url(
        url,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=_SOCKET_TIMEOUT,
        # A shard that is away must not stop the client from starting or its slot map from being
        # refreshed: the other shards' jobs go on (with `cluster-require-full-coverage no` on the servers).
        require_full_coverage=False,
    )
    await client.initialize()
    return client, True


async def check_queue_redis(redis: Redis) -> None:
    """Refuse a queue Redis that is a cluster node not owning the queues' slot: arq talks to one node
    and follows no redirection, so it would fail on every command (or after the next slot move)."""
    try:
        await redis.exists(keys.QUEUE_TAG + ":probe")
    except ResponseError as exc:
        if str(exc).startswith(("MOVED", "ASK")):
            raise RuntimeError(
                f"INFERQ_REDIS_URL is a cluster node that does not hold the queues' slot ({keys.QUEUE_TAG}); "
                "give the queue its own Redis (or a one-shard cluster) and put the cluster in "
                "INFERQ_EVENTS__REDIS_URL"
            ) from None
        raise


class ClusterTopology:
    """Which shard holds a key, from the cluster client's slot map, refreshed on demand (a redirect, a
    node that went away): concurrent asks for a refresh share one lookup."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._refreshing: asyncio.Task[None] | None = None
        self._last = 0.0

    def node(self, key: str) -> ClusterNode:
        manager = self.cluster.nodes_manager
        return manager.get_node_from_slot(self.cluster.keyslot(key))

    async def refresh(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh(), name="inferq-cluster-topology")
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last + _REFRESH_MIN_INTERVAL - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            await self.cluster.nodes_manager.initialize()
        except Exception as exc:  # no reachable node yet: the callers try again later
            log.info("cluster topology lookup failed (%s)", exc)
        finally:
            self._last = loop.time()


def new_connection(node: ClusterNode) -> Connection:
    """A connection of our own to `node`, with the cluster client's settings (auth, TLS, timeouts)."""
    return node.connection_class(**node.connection_kwargs)


class NodeLinks:
    """One connection per shard for pipelined writes; a pipeline holds its shard's connection until
    every reply is in, so replies never mix."""

    def __init__(self, topology: ClusterTopology) -> None:
        self.topology = topology
        self._links: dict[str, tuple[Connection, asyncio.Lock]] = {}

    def _link(self, node: ClusterNode) -> tuple[Connection, asyncio.Lock]:
        link = self._links.get(node.name)
        if link is None:
            link = self._links[node.name] = (new_connection(node), asyncio.Lock())
        return link

    async def pipeline(self, node: ClusterNode, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command's reply, or the exception it got. After a connection error, it and every later
        command of the pipeline get that error (their replies are unknown)."""
        conn, lock = self._link(node)
        results: list[Any] = []
        async with lock:
            try:
                await conn.send_packed_command(conn.pack_commands(commands), False)
                for _ in commands:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:
                        results.append(exc)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                results.extend([exc] * (len(commands) - len(results)))
        return results

    async def aclose(self) -> None:
        for conn, _ in self._links.values():
            with contextlib.suppress(Exception):
                await conn.disconnect()
        self._links.clear()
