"""A worker claims the jobs a poll found in one Lua call (worker/queue_claims.py), with arq's own rules:
a job runs once however many workers poll its queue; a job another worker holds, a deferred job and a
job beyond the worker's free slots stay where they are; the jobs it holds are not claimed again."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import func

from shared import keys
from tests.conftest import Servers
from worker.queue_claims import ClaimingWorker


@pytest.fixture
async def pool(servers: Servers) -> AsyncIterator[ArqRedis]:
    redis: ArqRedis = await create_pool(RedisSettings.from_dsn(servers.redis_url))
    yield redis
    await redis.aclose()


async def _record(ctx: dict[str, Any], n: int) -> None:
    ctx["ran"].append((ctx["name"], n))
    await ctx["release"].wait()


def _worker(pool: ArqRedis, queue: str, name: str, max_jobs: int, **ctx: Any) -> ClaimingWorker:
    return ClaimingWorker(
        functions=[func(_record, name="record")],
        queue_name=queue,
        redis_pool=pool,
        burst=True,
        handle_signals=False,
        poll_delay=0,
        max_jobs=max_jobs,
        keep_result=0,
        ctx={"name": name, "ran": [], **ctx},
    )


async def _enqueue(pool: ArqRedis, queue: str, n: int, **kwargs: Any) -> str:
    job = await pool.enqueue_job("record", n, _queue_name=queue, _job_id=f"{queue}:{n}", **kwargs)
    assert job is not None
    return job.job_id


async def test_two_workers_polling_one_queue_run_each_job_once(pool: ArqRedis) -> None:
    queue = f"test:claims:{secrets.token_hex(4)}"
    release = asyncio.Event()
    release.set()
    ran: list[tuple[str, int]] = []
    workers = [_worker(pool, queue, name, 4, release=release) for name in ("a", "b")]
    for w in workers:
        w.ctx["ran"] = ran
    try:
        for n in range(30):
            await _enqueue(pool, queue, n)
        await asyncio.gather(*(w.main() for w in workers))
        assert sorted(n for _, n in ran) == list(range(30)), ran
    finally:
        await pool.delete(queue)


async def test_a_claim_leaves_held_deferred_and_surplus_jobs(pool: ArqRedis) -> None:
    queue = f"test:claims:{secrets.token_hex(4)}"
    release = asyncio.Event()
    worker = _worker(pool, queue, "a", 2, release=release)
    try:
        due = [await _enqueue(pool, queue, n) for n in range(4)]
        deferred = await _enqueue(pool, queue, 9, _defer_by=60)
        # Another worker holds the first one.
        await pool.psetex(keys.ARQ_IN_PROGRESS_PREFIX + due[0], 60_000, b"1")
        await worker.start_jobs([i.encode() for i in [*due, deferred]])
        assert sorted(worker.tasks) == due[1:3]  # two free slots: the next two due jobs
        assert worker.job_counter == 2
        for job_id in due[1:3]:
            assert await pool.exists(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
        for job_id in (due[3], deferred):
            assert not await pool.exists(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
        # Full: the next poll claims nothing, and finds the held jobs held.
        await worker.start_jobs([i.encode() for i in due])
        assert sorted(worker.tasks) == due[1:3]
        release.set()
        await asyncio.gather(*worker.tasks.values())
        assert sorted(n for _, n in worker.ctx["ran"]) == [1, 2]
        assert worker.job_counter == 0
        # Slots free again: the last due job is taken, never a held one again.
        worker.tasks.clear()
        await worker.start_jobs([i.encode() for i in [*due, deferred]])
        assert list(worker.tasks) == [due[3]]
        await asyncio.gather(*worker.tasks.values())
    finally:
        release.set()
        await pool.delete(queue, *(keys.ARQ_IN_PROGRESS_PREFIX + i for i in due))


def test_an_embedding_worker_polls_sooner_while_busy(tmp_path: Path) -> None:
    from shared.settings import Settings
    from worker.main import EMBEDDING_BUSY_POLL_DELAY, build_worker
    from worker.model import fetch_embedding_model

    embedding = fetch_embedding_model(Path(Settings().embedding_model_path))
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "config.json").write_text("{}")
    urls = {"redis_url": "redis://127.0.0.1:1", "database_url": "postgresql://127.0.0.1:1/x"}
    cases: list[tuple[dict[str, str], dict[str, float], float]] = [
        ({"name": str(embedding)}, {}, EMBEDDING_BUSY_POLL_DELAY),
        ({"name": str(chat)}, {}, 0.05),
    ]
    cases.append(({"name": str(embedding)}, {"busy_poll_delay": 0.2}, 0.2))  # as set
    for model, worker, delay in cases:
        settings = Settings.model_validate({**urls, "model": model, "worker": worker})
        assert build_worker(settings).busy_poll_delay == delay, (model, worker)
