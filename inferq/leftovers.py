"""What a running `inferq up` has started, on disk (`run.json` in its data dir), so that nothing it
started outlives it: a watchdog process stops it all if `inferq up` dies without stopping it (even by
SIGKILL), and the next `inferq up` on the same data dir stops whatever is still left.

Run as `python -m inferq.leftovers WATCH_PID DATA_DIR`: the watchdog. It imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
STACK_FILE = "stack.json"  # the URLs a running `inferq up` publishes for `inferq keys` and other tools
# What each recorded process's command line contains: a pid the system gave to another program since
# is never signalled.
_MARKERS = {"valkey": "valkey", "postgres": "postgres", "child": "inferq"}


class StackRunning(RuntimeError):
    """Another live `inferq up` uses this data dir."""


def run_file(data_dir: Path) -> Path:
    return data_dir / RUN_FILE


def write_record(data_dir: Path, record: dict[str, Any]) -> None:
    path = run_file(data_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def read_record(data_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(run_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def remove_record(data_dir: Path) -> None:
    run_file(data_dir).unlink(missing_ok=True)


def alive(pid: int, marker: str) -> bool:
    """True while `pid` runs (not a zombie) a program whose command line contains `marker`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and marker in cmdline


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: list[tuple[int, str]], seconds: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + seconds
    left = [(p, m) for p, m in pids if alive(p, m)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [(p, m) for p, m in left if alive(p, m)]
    return left


def _stop(pids: list[tuple[int, str]], sig: signal.Signals, seconds: float) -> None:
    for pid, _ in pids:
        _signal(pid, sig)
    for pid, _ in _wait_gone(pids, seconds):
        _signal(pid, signal.SIGKILL)
    _wait_gone(pids, 2)


def stop_leftovers(data_dir: Path, *, children_grace: float = 15.0) -> list[str]:
    """Stop what the recorded run left running (its API and workers first, then the servers they
    use) and forget the record. Returns what was stopped, in words; raises StackRunning when the
    recorded `inferq up` is still alive."""
    record = read_record(data_dir)
    if record is None:
        return []
    supervisor = int(record.get("supervisor") or 0)
    if supervisor and supervisor != os.getpid() and alive(supervisor, "inferq"):
        raise StackRunning(
            f"another `inferq up` (pid {supervisor}) is running on {data_dir}: stop it first "
            f"(Ctrl-C in its terminal, or `kill {supervisor}`), or use another --data-dir"
        )
    stopped: list[str] = []
    children = [(int(p), _MARKERS["child"]) for p in (record.get("children") or {}).values() if p]
    children = [(p, m) for p, m in children if alive(p, m)]
    if children:
        # Two SIGTERMs: a worker drains on the first and hands its jobs back at once on the second.
        for pid, _ in children:
            _signal(pid, signal.SIGTERM)
        time.sleep(0.3)
        _stop(children, signal.SIGTERM, children_grace)
        stopped.append(f"{len(children)} API or worker process(es)")
    servers = record.get("servers") or {}
    # PostgreSQL's fast shutdown is SIGINT; Valkey saves and exits on SIGTERM.
    for name, label, sig in (
        ("postgres", "PostgreSQL", signal.SIGINT),
        ("valkey", "Valkey", signal.SIGTERM),
    ):
        pid = int(servers.get(name) or 0)
        if pid and alive(pid, _MARKERS[name]):
            _stop([(pid, _MARKERS[name])], sig, 10)
            stopped.append(f"{label} (pid {pid})")
    (data_dir / STACK_FILE).unlink(missing_ok=True)  # it named servers that are gone now
    remove_record(data_dir)
    return stopped


def watch(parent: int, data_dir: Path, poll: float = 0.5, say: Callable[[str], None] | None = None) -> None:
    """Wait for `parent` to end; then stop whatever its record still names."""
    while os.getppid() == parent:
        time.sleep(poll)
    try:
        stopped = stop_leftovers(data_dir)
    except StackRunning:  # a new `inferq up` has taken the data dir over, and with it what was left
        return
    if stopped and say is not None:
        say(f"inferq up (pid {parent}) ended without stopping its stack; stopped: {', '.join(stopped)}")


def main(argv: list[str]) -> int:
    # Ctrl-C in the terminal is for `inferq up`; this process must outlive it to do its one job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent, data_dir = int(argv[0]), Path(argv[1])
    watch(parent, data_dir, say=lambda m: print(f"inferq watchdog: {m}", file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
