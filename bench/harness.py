"""Bring up servers, migrations, an API and a worker for a benchmark run, and tear them down."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from inferq import embedded
from shared import keys
from shared.db import upgrade


@dataclass
class RunningStack:
    base_url: str
    redis_url: str
    database_url: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_stack(
    model_dir: Path,
    *,
    max_batch: int = 32,
    log_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningStack]:
    """Embedded Valkey + PostgreSQL in a temporary directory, then `inferq api` and `inferq worker`."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inferq-bench-")))
        redis_url = stack.enter_context(embedded.valkey(None))
        database_url = stack.enter_context(embedded.postgres(tmp / "pg", delete=True))
        upgrade(database_url)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")},
            "INFERQ_REDIS_URL": redis_url,
            "INFERQ_DATABASE_URL": database_url,
            "INFERQ_MODEL__NAME": str(model_dir),
            "INFERQ_MODEL__SERVED_NAME": "SmolLM2-135M-Instruct",
            "INFERQ_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        logs = log_dir or tmp
        port = _free_port()
        procs = []
        for args in (["api", "--port", str(port)], ["worker", "--max-batch", str(max_batch)]):
            out = (logs / f"{args[0]}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "inferq.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
        try:
            base = f"http://127.0.0.1:{port}"
            r = redis.Redis.from_url(redis_url)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a stack process exited; logs in {logs}")
                with contextlib.suppress(httpx.HTTPError):
                    ready = httpx.get(f"{base}/readyz", timeout=1).status_code == 200
                    if ready and list(r.scan_iter(match=keys.WORKER_PREFIX + "*")):
                        break
                time.sleep(0.2)
            else:
                raise RuntimeError("the stack did not start in time")
            r.close()
            yield RunningStack(base, redis_url, database_url)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
