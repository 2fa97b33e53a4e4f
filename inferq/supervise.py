"""The API and worker processes of `inferq up`, kept running: a child that dies is started again
after a backoff, and only a crash loop (or Ctrl-C / SIGTERM) stops the stack."""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1
# A child that exits this often within the window is in a crash loop; before the stack is first up
# (a bad setting, a model that does not load) fewer exits are enough to say so.
CRASH_WINDOW_SECONDS = 300.0
CRASH_LIMIT = 6
CRASH_LIMIT_STARTING = 3
BACKOFF_MAX_SECONDS = 30.0


class CrashLoop(RuntimeError):
    pass


def _die_with_parent() -> None:
    # Children get SIGTERM if `inferq up` itself dies, even by SIGKILL: no orphan API or workers.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    exits: list[float] = field(default_factory=list)
    restart_at: float | None = None
    last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def spawn(self, *, early: bool = False) -> None:
        """Start the process; `early`: before its settings are known (they follow with `configure`)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferq.cli", *self.args, *(["--settings-from-stdin"] if early else [])],
            env=self.env,
            stdin=subprocess.PIPE if early else subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches `inferq up`, which stops the children in order
        )
        self.restart_at = None

    def configure(self) -> None:
        """Hand an early-started process its settings (the INFERQ_* part of `env`)."""
        if self.proc is None or self.proc.stdin is None:
            return
        settings = {k: v for k, v in self.env.items() if k.startswith("INFERQ_")}
        with contextlib.suppress(OSError):  # it died meanwhile: check() starts it again
            self.proc.stdin.write((json.dumps(settings) + "\n").encode())
            self.proc.stdin.close()
        self.proc.stdin = None


@dataclass
class Supervisor:
    children: list[Child]
    say: Callable[[str], None]
    on_change: Callable[[], None] = lambda: None
    up: bool = False  # the stack has been up once: crash loops are judged less strictly

    def start(self, *, early: bool = False) -> None:
        for child in self.children:
            child.spawn(early=early)
        self.on_change()

    def configure(self, settings: dict[str, str]) -> None:
        for child in self.children:
            child.env.update(settings)
            child.configure()

    def check(self) -> list[Child]:
        """Notice exits, start again what is due; returns the children started again now."""
        now = time.monotonic()
        restarted: list[Child] = []
        for child in self.children:
            if child.proc is not None and child.restart_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                self._exited(child, code, now)
            if child.restart_at is not None and now >= child.restart_at:
                child.spawn()
                self.say(f"{child.name} started again (pid {child.proc.pid if child.proc else '?'})")
                restarted.append(child)
        if restarted:
            self.on_change()
        return restarted

    def _exited(self, child: Child, code: int, now: float) -> None:
        child.last_exit = code
        child.exits = [t for t in child.exits if now - t < CRASH_WINDOW_SECONDS] + [now]
        limit = CRASH_LIMIT if self.up else CRASH_LIMIT_STARTING
        if len(child.exits) >= limit:
            raise CrashLoop(
                f"{child.name} exited {len(child.exits)} times in {CRASH_WINDOW_SECONDS / 60:.0f} minutes "
                f"(last: {describe_exit(code)}); stopping the stack. Its log is above."
            )
        delay = min(BACKOFF_MAX_SECONDS, 2.0 ** (len(child.exits) - 1))
        child.restart_at = now + delay
        self.say(f"{child.name} exited ({describe_exit(code)}); starting it again in {delay:.0f}s")

    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for c in self.children if c.pid is not None}

    def _running(self) -> list[subprocess.Popen[bytes]]:
        return [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]

    def signal_all(self) -> None:
        for proc in self._running():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def wait_all(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for proc in self._running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def kill_all(self) -> None:
        for proc in self._running():
            proc.kill()
            proc.wait()
