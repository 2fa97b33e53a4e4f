"""Bring up servers, migrations, an API and a worker for a benchmark run, and tear them down."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.procs import free_port, spawn, stop, wait_until
from inferq import embedded
from shared import keys
from shared.db import upgrade

SERVED_NAME = "SmolLM2-135M-Instruct"


def demo_model() -> Path:
    """The configured model directory, fetched (and converted) first when it is not there yet."""
    from shared.settings import Settings
    from worker.model import fetch_demo_model, is_fetched

    target = Path(Settings().model_path)
    if not is_fetched(target):
        print(f"fetching the demo model into {target}…", flush=True)
        fetch_demo_model(target, progress=lambda m: print(f"  {m}", flush=True))
    return target


@dataclass
class RunningStack:
    base_url: str
    redis_url: str
    database_url: str
    api_pid: int = 0
    worker_pid: int | None = None
    log_dir: Path | None = None


# What a worker of another version must answer before its stack counts as ready: a one-token chat.
CHAT_PROBE = (
    "/v1/chat/completions",
    {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
)


def _ready(
    base: str, redis_url: str, want_worker: bool, probe: tuple[str, dict[str, Any]] | None = None
) -> bool:
    if httpx.get(f"{base}/readyz", timeout=1).status_code != 200:
        return False
    if not want_worker:
        return True
    if probe is not None:  # another version's workers may register elsewhere: ready once one answers
        path, body = probe
        return httpx.post(f"{base}{path}", json=body, timeout=5).status_code == 200
    with redis.Redis.from_url(redis_url) as r:
        return bool(r.zcard(keys.WORKER_INDEX))  # a worker registered (shared.fleet)


@contextlib.contextmanager
def running_stack(
    model_dir: Path,
    *,
    max_batch: int = 32,
    log_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    worker: bool = True,
    code: Path | None = None,
    ready_timeout: float = 180,
    probe: tuple[str, dict[str, Any]] = CHAT_PROBE,
) -> Iterator[RunningStack]:
    """Embedded Valkey + PostgreSQL in a temporary directory, then `inferq api` and (unless `worker` is
    false) `inferq worker`; every process is stopped on exit, and dies with the benchmark. `code`: run
    the servers from another checkout of inferq (e.g. a `git worktree` of main, to compare against),
    ready once its worker answers `probe` (a path and a JSON body)."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inferq-bench-")))
        redis_url = stack.enter_context(embedded.valkey(None))
        database_url = stack.enter_context(embedded.postgres(tmp / "pg", delete=True))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")},
            "INFERQ_REDIS_URL": redis_url,
            "INFERQ_DATABASE_URL": database_url,
            "INFERQ_MODEL__NAME": str(model_dir),
            "INFERQ_MODEL__SERVED_NAME": SERVED_NAME,
            "INFERQ_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        if code is None:
            upgrade(database_url)
        else:  # `python -m` puts the working directory first on sys.path
            env["PYTHONPATH"] = str(code)
            # That checkout's own migrations: its servers refuse a schema newer than they know.
            subprocess.run(
                [sys.executable, "-m", "inferq.cli", "migrate"],
                env=env,
                cwd=code,
                check=True,
                capture_output=True,
            )
        logs = log_dir or tmp
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        commands = [["api", "--port", str(port)]]
        if worker:
            commands.append(["worker", "--max-batch", str(max_batch)])
        procs = []
        try:
            for args in commands:
                procs.append(
                    spawn(
                        [sys.executable, "-m", "inferq.cli", *args],
                        env=env,
                        log=logs / f"{args[0]}.log",
                        cwd=code,
                    )
                )
            base = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: _ready(base, redis_url, worker, probe if code is not None else None),
                procs,
                timeout=ready_timeout,
                what=f"inferq stack (logs in {logs})",
            )
            yield RunningStack(
                base,
                redis_url,
                database_url,
                api_pid=procs[0].pid,
                worker_pid=procs[1].pid if worker else None,
                log_dir=logs,
            )
        finally:
            for p in procs:
                stop(p, timeout=30)
