"""`inferq up`: the whole stack on one machine: migrations, API, workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from inferq import leftovers
from inferq.keycounts import KeyCounts, auth_line, count_keys, keys_required
from inferq.supervise import Child, Supervisor
from shared import aio
from shared.settings import Settings

console = Console(stderr=True, highlight=False)
READY_TIMEOUT_SECONDS = 600.0
# The banner's last words: whoever reads the banner from a log (a script, the tests) waits for them to
# know it is whole, since it comes in several writes.
BANNER_END = "Ctrl-C stops everything"


def stack_file(settings: Settings) -> Path:
    """Where a running `inferq up` leaves its URLs, for `inferq keys` and other local tools."""
    return Path(settings.data_dir).expanduser().resolve() / leftovers.STACK_FILE


def _write_stack_file(path: Path, urls: dict[str, str]) -> None:
    # 0600 from the first byte (the URLs may hold a password), and replaced whole so no reader sees half.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        json.dump(urls, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def _step(text: str) -> Iterator[None]:
    t0 = time.monotonic()
    # A live clock beside the spinner: a long step (a model download and conversion) shows it moves.
    columns = (SpinnerColumn(), TextColumn(f"[bold]{escape(text)}…"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(text, total=None)
        yield
    console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")


def _say(text: str) -> None:
    console.print(f"[yellow]•[/] {escape(text)}", soft_wrap=True)


def _devices(workers: int, device: str | None) -> list[str]:
    if device:
        return [device] * workers
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return ["cpu"] * workers
    # Asking torch would cost this process seconds of imports; nvidia-smi answers in milliseconds.
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        if n:
            return [f"cuda:{i % n}" for i in range(workers)]
    return ["cpu"] * workers


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_taken(host: str, port: int) -> str | None:
    """Why the API could not listen on host:port (another server has it), or None: said before
    anything starts, rather than as an API process that exits again and again."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


class _Fleet:
    """The stack's view of the worker registry, through the one reader the API uses too."""

    def __init__(self, redis_url: str) -> None:
        from redis.asyncio import Redis

        self._loop = asyncio.new_event_loop()
        self._redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    async def _pids(self) -> set[int]:
        from shared.fleet import live_workers

        return {int(w["pid"]) for w in await live_workers(self._redis) if w.get("pid")}

    def registered(self) -> set[int]:
        try:
            return self._loop.run_until_complete(aio.wait_for(self._pids(), 3))
        except Exception:  # Redis restarting: nothing is known to be registered
            return set()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._redis.aclose())
        self._loop.close()


def _api_ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    return False


def _ready_timeout(settings: Settings) -> float:
    """A vLLM worker installs vLLM on first use (minutes), then loads it: its own bound on top."""
    if settings.worker.engine == "vllm" and not settings.worker.upstream_url:
        return READY_TIMEOUT_SECONDS + settings.worker.vllm_start_seconds
    return READY_TIMEOUT_SECONDS


def _wait_ready(
    url: str, fleet: _Fleet, sup: Supervisor, workers: list[Child], timeout: float = READY_TIMEOUT_SECONDS
) -> None:
    """Until the API answers /readyz and every worker child is in the registry (restarting what dies)."""
    deadline = time.monotonic() + timeout
    api_ok = False
    while time.monotonic() < deadline:
        sup.check()
        api_ok = api_ok or _api_ready(url)
        pids = {w.pid for w in workers}
        if api_ok and None not in pids and pids <= fleet.registered():
            return
        time.sleep(0.2)
    missing = "the API" if not api_ok else "a worker's registration"
    raise RuntimeError(f"the stack did not become ready in {timeout / 60:.0f} minutes ({missing})")


def _stop_children(sup: Supervisor, drain: float) -> None:
    """SIGTERM: workers drain (finish held jobs for up to `drain` seconds, then hand the rest back).
    Ctrl-C again: a second SIGTERM, and workers hand their jobs back at once."""
    sup.signal_all()
    if drain > 0 and sup.pids():
        console.print(f"[dim]workers finish their jobs (up to {drain:.0f}s); Ctrl-C again to stop now[/]")
    try:
        sup.wait_all(drain + 10)
    except (KeyboardInterrupt, _Stop):
        sup.signal_all()
        sup.wait_all(15)
    sup.kill_all()


def _command() -> str:
    """How the user starts this console script: `inferq` when it is on PATH, else its path."""
    me = Path(sys.argv[0])
    on_path = shutil.which("inferq")
    if me.name != "inferq" or (on_path and Path(on_path).resolve() == me.resolve()):
        return "inferq"
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(me)
        return rel if not rel.startswith("../../") else str(me)
    return str(me)


def _banner(
    url: str,
    data_dir: Path,
    settings: Settings,
    keys: KeyCounts | None,
    metrics: list[str],
    seconds: float,
) -> None:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    cli = _command()
    console.print(
        f"\n[bold green]inferq is up[/] in {seconds:.1f}s — API docs: [link]{url}/docs[/]", soft_wrap=True
    )
    admin_key = settings.admin_key is not None
    line = escape(auth_line(settings.auth, keys, admin_key))
    loud = settings.auth == "off" and keys is not None and keys.ever
    console.print(f"[bold red]{line}[/]" if loud else line, soft_wrap=True)
    required = keys_required(settings.auth, keys, admin_key)
    bearer = ' -H "authorization: Bearer $INFERQ_API_KEY"' if required else ""
    console.print("Try it (in another shell):")
    if required:
        console.print("  export INFERQ_API_KEY=<your key>", soft_wrap=True)
    console.print(
        f"  curl -s {url}/v1/jobs{bearer} -H 'content-type: application/json' -d '{body}'", soft_wrap=True
    )
    console.print(f"  {cli} submit 'What is the capital of France?' --stream", soft_wrap=True)
    engine: str = settings.worker.engine
    if engine == "vllm":
        engine += " (vLLM's OpenAI server beside each worker)"
    console.print(f"[dim]engine: {escape(engine)}[/]", soft_wrap=True)
    if metrics:
        console.print(f"[dim]metrics: {url}/metrics (API) · {' · '.join(metrics)}[/]", soft_wrap=True)
    console.print(f"[dim]data: {data_dir} · {BANNER_END}[/]\n", soft_wrap=True)


def _count_keys(database_url: str) -> KeyCounts | None:
    try:
        return count_keys(database_url)
    except Exception:  # the banner is no reason to stop a stack that is up
        return None


def _metrics_ports(workers: int, host: str) -> list[int]:
    """Each worker's /metrics port: INFERQ_WORKER__METRICS_PORT (the first; 0 turns them off), else
    free ports."""
    configured = os.environ.get("INFERQ_WORKER__METRICS_PORT")
    if configured is not None and configured.strip().isdigit():
        base = int(configured)
        return [base + i if base else 0 for i in range(workers)]
    return [_free_port(host) for _ in range(workers)]


def _with_embedding_model(env: dict[str, str], name: str, path: str) -> dict[str, str]:
    """`env` whose INFERQ_EXTRA_MODELS names the embedding model too (the API counts its tokens)."""
    extra = json.loads(env.get("INFERQ_EXTRA_MODELS") or "{}")
    extra.setdefault(name, path)
    return {**env, "INFERQ_EXTRA_MODELS": json.dumps(extra)}


def _children(
    env: dict[str, str],
    host: str,
    port: int,
    workers: int,
    device: str | None,
    embedding_model: str | None = None,
    embedding_engine: str = "transformers",
) -> tuple[list[Child], list[str]]:
    """The API and the workers; with `embedding_model` (a directory), one more worker that serves it
    on `embedding_engine`."""
    metrics_host = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    if embedding_model is not None:
        env = _with_embedding_model(env, Path(embedding_model).name, embedding_model)
    children = [Child("api", ["api", "--host", host, "--port", str(port)], env)]
    metrics: list[str] = []
    devices = _devices(workers, device)
    commands = [["worker", "--device", dev] for dev in devices]
    if embedding_model is not None:
        # Beside the first chat worker: an embedding model is small, and its passes are short.
        commands.append(
            ["worker", "--model", embedding_model, "--engine", embedding_engine, "--device", devices[0]]
        )
    ports = _metrics_ports(len(commands), metrics_host)
    for i, (command, mport) in enumerate(zip(commands, ports, strict=True)):
        worker_env = {
            **env,
            "INFERQ_WORKER__METRICS_PORT": str(mport),
            "INFERQ_WORKER__METRICS_HOST": "0.0.0.0" if host in ("0.0.0.0", "::") else metrics_host,
            "INFERQ_WORKER__ADVERTISE_HOST": metrics_host,
        }
        children.append(Child(f"worker {i + 1}", command, worker_env))
        if mport:
            metrics.append(f"http://{metrics_host}:{mport}/metrics (worker {i + 1})")
    return children, metrics


def _start_watchdog(data_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "inferq.leftovers", str(os.getpid()), str(data_dir)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C is for this process; the watchdog must outlive it
    )


def _supervise(sup: Supervisor, fleet: _Fleet, workers: list[Child]) -> None:
    """Keep the stack running until a signal or a crash loop; say when a restarted worker serves again."""
    returning: dict[int, str] = {}
    while True:
        for child in sup.check():
            if child in workers and child.proc is not None:
                returning[child.proc.pid] = child.name
        if returning:
            registered = fleet.registered()
            for pid in [p for p in returning if p in registered]:
                _say(f"{returning.pop(pid)} is serving again (pid {pid})")
        time.sleep(0.5)


def _leave_record(data_dir: Path, record: dict[str, Any]) -> None:
    """Forget the run once nothing it recorded is alive; otherwise the watchdog or the next run stops it."""
    servers = record.get("servers") or {}
    if not any(leftovers.alive(int(pid), name) for name, pid in servers.items() if pid):
        leftovers.remove_record(data_dir)


def _servers(
    settings: Settings, data_dir: Path, stack: contextlib.ExitStack, record: dict[str, Any]
) -> tuple[str, str]:
    from inferq import embedded

    servers: dict[str, int] = record["servers"]
    redis_url = settings.redis_url
    if not redis_url:
        with _step("starting embedded Valkey"):
            redis_url = stack.enter_context(embedded.valkey(data_dir / "valkey", servers))
        leftovers.write_record(data_dir, record)
    database_url = settings.database_url
    if not database_url:
        with _step("starting embedded PostgreSQL"):
            database_url = stack.enter_context(embedded.postgres(data_dir / "postgres", pids=servers))
        leftovers.write_record(data_dir, record)
    return redis_url, database_url


def _prepare(settings: Settings, database_url: str, embeddings: bool) -> None:
    from shared.db import upgrade

    with _step("applying database migrations"):
        upgrade(database_url)
    if embeddings:
        from worker.model import fetch_embedding_model, is_fetched

        target = Path(settings.embedding_model_path)
        if not is_fetched(target):
            with _step(f"fetching the demo embedding model {target.name}"):
                fetch_embedding_model(target, progress=lambda m: console.print(f"  [dim]{m}[/]"))
    if not settings.model.name:
        from worker.model import fetch_demo_model, is_fetched

        target = Path(settings.model_path)
        if not is_fetched(target):
            with _step(f"fetching the demo model {settings.served_model_name}"):
                fetch_demo_model(target, progress=lambda m: console.print(f"  [dim]{m}[/]"))


def up(
    settings: Settings, host: str, port: int, workers: int, device: str | None, embeddings: bool = False
) -> int:
    t0 = time.monotonic()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_stop)
    # SIGINT is Ctrl-C even when this process was started with it ignored (from a script, in the
    # background of a shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stopped = leftovers.stop_leftovers(data_dir)
    except leftovers.StackRunning as exc:
        console.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
        return 1
    taken = _port_taken(host, port)
    if taken:
        console.print(f"[red]cannot serve on {host}:{port}: {escape(taken)}; choose another with --port[/]")
        return 1
    if stopped:
        _say(f"an earlier inferq up on {data_dir} left processes running; stopped: {', '.join(stopped)}")
    record: dict[str, Any] = {"supervisor": os.getpid(), "servers": {}, "children": {}}
    leftovers.write_record(data_dir, record)
    watchdog = _start_watchdog(data_dir)
    try:
        return _run(settings, data_dir, record, host, port, workers, device, embeddings, t0)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        _leave_record(data_dir, record)
        watchdog.terminate()
        watchdog.wait()


def _run(
    settings: Settings,
    data_dir: Path,
    record: dict[str, Any],
    host: str,
    port: int,
    workers: int,
    device: str | None,
    embeddings: bool,
    t0: float,
) -> int:
    sup: Supervisor | None = None
    fleet: _Fleet | None = None
    urls_file: Path | None = None
    with contextlib.ExitStack() as stack:
        try:
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            embedding_model = settings.embedding_model_path if embeddings else None
            # On vLLM's pooling runner when the chat workers run their own vLLM; else in process.
            own_vllm = settings.worker.engine == "vllm" and not settings.worker.upstream_url
            children, metrics = _children(
                dict(os.environ),
                host,
                port,
                workers,
                device,
                embedding_model,
                "vllm" if own_vllm else "transformers",
            )

            def remember() -> None:
                record["children"] = sup.pids() if sup is not None else {}
                leftovers.write_record(data_dir, record)

            sup = Supervisor(children, _say, remember)
            # Started now, they import torch and transformers while the servers start; their settings
            # (where the servers are) follow on stdin.
            sup.start(early=True)
            redis_url, database_url = _servers(settings, data_dir, stack, record)
            _prepare(settings, database_url, embeddings)
            fleet = _Fleet(redis_url)
            what = f"starting the API and {len(children) - 1} worker(s)"
            if settings.worker.engine == "vllm":
                what += " with vLLM (installed on first use, then loaded: minutes)"
            with _step(what):
                sup.configure(
                    {
                        "INFERQ_REDIS_URL": redis_url,
                        "INFERQ_DATABASE_URL": database_url,
                        "INFERQ_DATA_DIR": str(data_dir),
                    }
                )
                _wait_ready(url, fleet, sup, children[1:], _ready_timeout(settings))
            sup.up = True
            urls_file = stack_file(settings)
            _write_stack_file(
                urls_file, {"redis_url": redis_url, "database_url": database_url, "api_url": url}
            )
            active = _count_keys(database_url)
            _banner(url, data_dir, settings, active, metrics, time.monotonic() - t0)
            _supervise(sup, fleet, children[1:])
            return 1  # not reached: _supervise returns only by an exception
        except RuntimeError as exc:  # a crash loop, or no readiness in time: said, not a traceback
            console.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True)
            return 1
        except (KeyboardInterrupt, _Stop):
            console.print("\n[bold]stopping…[/]")
            return 0
        finally:
            # Only the file this run wrote: a second `inferq up` that failed to start leaves the first's.
            if urls_file is not None:
                urls_file.unlink(missing_ok=True)
            if sup is not None:
                _stop_children(sup, drain=settings.worker.drain_seconds)
            if fleet is not None:
                fleet.close()
