"""Server processes for benchmarks: start one, wait until it answers, and make sure it dies with us."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

_SETPRIV = shutil.which("setpriv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent(args: Sequence[str]) -> list[str]:
    """`args`, run so that the child gets SIGTERM if the benchmark dies, even by SIGKILL (Linux, through
    util-linux's setpriv, which then execs the command under the same pid); unchanged elsewhere."""
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *args] if _SETPRIV else list(args)


def spawn(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `args` in its own process group (in `cwd`), output to `log`, killed if the benchmark dies."""
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            die_with_parent(args),
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not None and not isinstance(out, int):
            out.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children of the server, if any survived
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def wait_until(
    ready: Callable[[], bool], procs: Sequence[subprocess.Popen[bytes]], *, timeout: float, what: str
) -> None:
    """Poll `ready` until it is true; fail early if a process exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what} exited with code {p.returncode} before it was ready")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.25)
    raise RuntimeError(f"{what} was not ready after {timeout:.0f} s")


@contextlib.contextmanager
def server(
    args: Sequence[str],
    *,
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 300.0,
    what: str = "server",
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process that is ready (per `ready`) on entry and stopped on exit, whatever happens."""
    proc = spawn(args, env=env, log=log)
    try:
        wait_until(ready, [proc], timeout=timeout, what=what)
        yield proc
    finally:
        stop(proc)


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `finally` blocks stop the servers when we are killed."""

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
