"""`inferq up`: the whole stack on one machine: migrations, API, workers."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console
from rich.markup import escape

from shared.settings import Settings

console = Console(stderr=True, highlight=False)
_PR_SET_PDEATHSIG = 1


def stack_file(settings: Settings) -> Path:
    """Where a running `inferq up` leaves its URLs, for `inferq keys` and other local tools."""
    return Path(settings.data_dir).expanduser().resolve() / "stack.json"


def _write_stack_file(path: Path, urls: dict[str, str]) -> None:
    # 0600 from the first byte (the URLs may hold a password), and replaced whole so no reader sees half.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        json.dump(urls, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def auth_line(mode: str, active_keys: int | None) -> str:
    """The banner's word on API keys; `active_keys` is None when they could not be counted."""
    hint = "create one with `inferq keys create --tenant NAME`"
    if mode == "off":
        return "auth: open (INFERQ_AUTH=off)"
    if active_keys == 0:
        if mode == "auto":
            return f"auth: open (no API keys; {hint})"
        return f"auth: API keys required, and none exists yet: {hint}"
    if active_keys is None and mode == "auto":
        return "auth: API keys required as soon as one exists (`inferq keys list`)"
    return "auth: API keys required (clients send them with --api-key or INFERQ_API_KEY)"


def _die_with_parent() -> None:
    # Children get SIGTERM if `inferq up` itself dies, even by SIGKILL: no orphan servers or workers.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def _step(text: str) -> Iterator[None]:
    t0 = time.monotonic()
    with console.status(f"[bold]{text}…"):
        yield
    console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")


def _devices(workers: int, device: str | None) -> list[str]:
    if device:
        return [device] * workers
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return [f"cuda:{i % n}" for i in range(workers)]
    return ["cpu"] * workers


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "inferq.cli", *args],
        env=env,
        preexec_fn=_die_with_parent,
        start_new_session=True,
    )


def _wait_ready(
    url: str, settings_env: dict[str, str], workers: int, procs: list[subprocess.Popen[bytes]]
) -> None:
    import redis

    r = redis.Redis.from_url(settings_env["INFERQ_REDIS_URL"])
    deadline = time.monotonic() + 600
    api_ok = False
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a child process exited during start-up (exit code {p.returncode})")
        if not api_ok:
            with contextlib.suppress(httpx.HTTPError):
                api_ok = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        live = len(list(r.scan_iter(match="inferq:worker:*", count=1000)))
        if api_ok and live >= workers:
            r.close()
            return
        time.sleep(0.2)
    raise RuntimeError("the stack did not become ready in 10 minutes")


def _signal_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)


def _wait_all(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))


def _stop_children(procs: list[subprocess.Popen[bytes]], drain: float) -> None:
    """SIGTERM: workers drain (finish held jobs for up to `drain` seconds, then hand the rest back).
    Ctrl-C again: a second SIGTERM, and workers hand their jobs back at once."""
    _signal_all(procs)
    if drain > 0 and any(p.poll() is None for p in procs):
        console.print(f"[dim]workers finish their jobs (up to {drain:.0f}s); Ctrl-C again to stop now[/]")
    try:
        _wait_all(procs, drain + 10)
    except (KeyboardInterrupt, _Stop):
        _signal_all(procs)
        _wait_all(procs, 15)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _banner(url: str, stack_env: dict[str, str], auth_mode: str, active_keys: int | None) -> None:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    console.print(f"\n[bold green]inferq is up[/] — API docs: [link]{url}/docs[/]")
    console.print(escape(auth_line(auth_mode, active_keys)), soft_wrap=True)
    required = auth_mode == "on" or (auth_mode == "auto" and bool(active_keys))
    bearer = ' -H "authorization: Bearer $INFERQ_API_KEY"' if required else ""
    console.print("Try it:")
    console.print(
        f"  curl -s {url}/v1/jobs{bearer} -H 'content-type: application/json' -d '{body}'", soft_wrap=True
    )
    console.print("  inferq submit 'What is the capital of France?' --stream")
    console.print(f"[dim]data: {stack_env['INFERQ_DATA_DIR']} · Ctrl-C stops everything[/]\n")


def _count_keys(database_url: str) -> int | None:
    from inferq.keys_cli import active_key_count

    try:
        return active_key_count(database_url)
    except Exception:  # the banner is no reason to stop a stack that is up
        return None


def up(settings: Settings, host: str, port: int, workers: int, device: str | None) -> int:
    from inferq import embedded
    from shared.db import upgrade

    data_dir = Path(settings.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_stop)
    procs: list[subprocess.Popen[bytes]] = []
    urls_file: Path | None = None
    with contextlib.ExitStack() as stack:
        try:
            redis_url = settings.redis_url
            if not redis_url:
                with _step("starting embedded Valkey"):
                    redis_url = stack.enter_context(embedded.valkey(data_dir / "valkey"))
            database_url = settings.database_url
            if not database_url:
                with _step("starting embedded PostgreSQL"):
                    database_url = stack.enter_context(embedded.postgres(data_dir / "postgres"))
            with _step("applying database migrations"):
                upgrade(database_url)
            if not settings.model.name:
                from worker.model import fetch_demo_model, is_fetched

                target = Path(settings.model_path)
                if not is_fetched(target):
                    with _step(f"fetching the demo model {settings.served_model_name}"):
                        fetch_demo_model(target, progress=lambda m: console.print(f"  [dim]{m}[/]"))
            env = {
                **os.environ,
                "INFERQ_REDIS_URL": redis_url,
                "INFERQ_DATABASE_URL": database_url,
                "INFERQ_DATA_DIR": str(data_dir),
            }
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            with _step(f"starting the API and {workers} worker(s)"):
                procs.append(_spawn(["api", "--host", host, "--port", str(port)], env))
                for dev in _devices(workers, device):
                    procs.append(_spawn(["worker", "--device", dev], env))
                _wait_ready(url, env, workers, procs)
            urls_file = stack_file(settings)
            _write_stack_file(
                urls_file, {"redis_url": redis_url, "database_url": database_url, "api_url": url}
            )
            _banner(url, env, settings.auth, _count_keys(database_url))
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            console.print("[red]a child process exited; stopping the stack[/]")
            return 1
        except (KeyboardInterrupt, _Stop):
            console.print("\n[bold]stopping…[/]")
            return 0
        finally:
            # Only the file this run wrote: a second `inferq up` that failed to start leaves the first's.
            if urls_file is not None:
                urls_file.unlink(missing_ok=True)
            _stop_children(procs, drain=settings.worker.drain_seconds)
