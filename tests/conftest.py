"""Test fixtures: real Redis and Postgres (from INFERQ_TEST_* URLs, else embedded), the real demo model,
and the API and a worker as separate processes, the way they run in production."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from inferq import embedded
from shared import fleet
from shared.db import async_url
from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TEST_REDIS_DB = 15  # the tests flush this database of a shared Redis, at start and at the end


@dataclass
class Servers:
    redis_url: str
    database_url: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_db(url: str, db: int) -> str:
    base = url.split("?")[0].rstrip("/")
    if base.count("/") > 2:  # already names a database
        return url
    return f"{base}/{db}"


async def _admin(url: str, sql: str) -> None:
    engine = create_async_engine(async_url(url), isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.exec_driver_sql(sql)
    await engine.dispose()


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("INFERQ_TEST_REDIS_URL")
        if redis_url:
            redis_url = _with_db(redis_url, TEST_REDIS_DB)
        else:
            redis_url = stack.enter_context(embedded.valkey(None))
        server_db = os.environ.get("INFERQ_TEST_DATABASE_URL")
        if not server_db:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inferq-pg-")))
            server_db = stack.enter_context(embedded.postgres(tmp / "pg", delete=True))
        # A database of our own on that server, dropped at the end.
        name = f"inferq_test_{secrets.token_hex(4)}"
        asyncio.run(_admin(server_db, f'CREATE DATABASE "{name}"'))
        database_url = make_url(async_url(server_db)).set(database=name).render_as_string(hide_password=False)
        r = redis_sync.Redis.from_url(redis_url)
        r.flushdb()
        try:
            yield Servers(redis_url, database_url)
        finally:
            r.flushdb()
            r.close()
            asyncio.run(_admin(server_db, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from worker.model import fetch_demo_model

    return fetch_demo_model(Path(Settings().model_path))


def _env(servers: Servers, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(
        INFERQ_REDIS_URL=servers.redis_url,
        INFERQ_DATABASE_URL=servers.database_url,
        INFERQ_MODEL__NAME=str(model_dir),
        INFERQ_MODEL__SERVED_NAME="SmolLM2-135M-Instruct",
        # Greedy answers the tests read ("Paris") must not depend on which requests shared a step or a
        # cached prefix: in float32 they do not (docs/engine.md); `auto` picks bfloat16 on CPUs that run
        # it natively, where they can. tests/test_dtype.py and the bench cover the default itself.
        INFERQ_MODEL__DTYPE="float32",
        PYTHONUNBUFFERED="1",
        # Webhook receivers in the tests listen on loopback, and retries come seconds apart. Every API
        # process of a session gets these: whichever holds the dispatcher's lease sends the deliveries.
        # Only loopback at all: no test, the fuzz test's random URLs included, can reach beyond.
        INFERQ_WEBHOOKS__ALLOW_PRIVATE="true",
        INFERQ_WEBHOOKS__ALLOW_ONLY='["127.0.0.0/8", "::1/128"]',
        INFERQ_WEBHOOKS__RETRY_SCHEDULE="[0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]",
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    """A child process (api or worker) with its log file."""

    args: list[str]
    env: dict[str, str]
    log_dir: Path
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    starts: int = field(default=0)

    def start(self) -> None:
        self.starts += 1
        self.log = self.log_dir / f"{self.args[0]}-{os.getpid()}-{id(self)}-{self.starts}.log"
        out = self.log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "inferq.cli", *self.args],
            env=self.env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def tail(self, n: int = 60) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def send(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def wait_for(predicate: Any, timeout: float, what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if not p.alive:
                raise AssertionError(f"{p.args[0]} exited while waiting for {what}:\n{p.tail()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n---\n".join(p.tail() for p in procs))


def live_workers(redis_url: str) -> int:
    """How many workers the registry lists, read the way the API and `inferq up` read it."""
    return len(registry(redis_url))


def registry(redis_url: str) -> list[dict[str, Any]]:
    """The live workers' registry entries (shared.fleet), from sync code or from inside a test's loop."""

    async def read() -> list[dict[str, Any]]:
        r = AsyncRedis.from_url(redis_url)
        try:
            return await fleet.live_workers(r)
        finally:
            await r.aclose()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result()


@dataclass
class Stack:
    servers: Servers
    base_url: str
    api: Proc
    workers: list[Proc]

    @property
    def worker(self) -> Proc:
        return self.workers[0]

    def restart_worker(self, sig: int = signal.SIGTERM) -> None:
        live = live_workers(self.servers.redis_url)
        self.worker.stop(sig)
        self.wait_workers(live - 1)
        self.worker.start()
        self.wait_workers(live)

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        wait_for(
            lambda: live_workers(self.servers.redis_url) == n,
            timeout,
            f"{n} live worker(s)",
            [self.api] + ([w for w in self.workers if w.alive] if n else []),
        )

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.api.stop()


def launch(
    servers: Servers, model_dir: Path, logs: Path, *, workers: int = 1, max_batch: int = 16, **env_extra: str
) -> Stack:
    """Migrate, then start an API and `workers` worker processes against `servers`; wait until all serve."""
    env = _env(servers, model_dir, **env_extra)
    subprocess.run(
        [sys.executable, "-m", "inferq.cli", "migrate"], env=env, cwd=REPO, check=True, capture_output=True
    )
    port = _free_port()
    api = Proc(["api", "--port", str(port)], env, logs)
    procs = [
        Proc(["worker", "--max-batch", str(max_batch), "--metrics-port", str(_free_port())], env, logs)
        for _ in range(workers)
    ]
    api.start()
    for w in procs:
        w.start()
    base = f"http://127.0.0.1:{port}"

    def api_ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        return False

    s = Stack(servers, base, api, procs)
    try:
        wait_for(api_ready, 120, "the API", [api])
        s.wait_workers(workers)
    except BaseException:
        s.stop()
        raise
    return s


def start_api(stack: Stack, **env: str) -> tuple[str, Proc]:
    """Another API process on the stack's servers (with its own settings); returns its URL and process."""
    port = _free_port()
    api = Proc(["api", "--port", str(port)], {**stack.api.env, **env}, stack.api.log_dir)
    api.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        return False

    try:
        wait_for(ready, 120, "an extra API", [api])
    except BaseException:  # a failed or timed-out start (pytest-timeout raises in here) leaves nothing
        api.stop()
        raise
    return url, api


@pytest.fixture(scope="session")
def stack(servers: Servers, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A SIGTERMed worker hands its jobs back at once here; draining is tested on a stack of its own.
    # Tests on this stack fill the engine on purpose, and on a slow machine the fleet's measured rate
    # can be low enough for admission control to refuse them: admission is tested on an API of its own.
    s = launch(
        servers,
        model_dir,
        tmp_path_factory.mktemp("logs"),
        INFERQ_LIMITS__MAX_TOKENS="6000",
        # Tests make keys in this database (on APIs of their own, auth on); in `auto` the first key
        # would close this API for good (auth fails closed), so it runs open: auth is tested apart.
        INFERQ_AUTH="off",
        INFERQ_WORKER__DRAIN_SECONDS="0",
        INFERQ_MAX_QUEUE_SECONDS="100000",
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[AsyncRedis]:
    """A client of the session's Redis, for tests that read or write keys themselves."""
    r = AsyncRedis.from_url(servers.redis_url)
    try:
        yield r
    finally:
        await r.aclose()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=httpx.Timeout(30.0)) as c:
        yield c
