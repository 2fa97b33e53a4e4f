"""The worker registry (its index, expiry and pruning), what /metrics and a queued job's poll cost Redis
(no SCAN), and the metrics token of the API's and a worker's /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import insert, select

from shared import fleet, keys
from shared.db import create_engine
from shared.metrics_auth import METRICS_TOKEN_REQUIRED
from shared.models import Job, new_job_id
from tests.conftest import Servers, Stack, _free_port, start_api
from tests.helpers import FRANCE
from worker import metrics as worker_metrics

TOKEN = "scrape-secret-1"
# A model the extra API knows but no real worker serves: its jobs stay queued for as long as a test needs.
OTHER = "metrics-test-model"


def _worker(worker_id: str, model: str = OTHER, **extra: Any) -> dict[str, Any]:
    return {
        "id": worker_id,
        "model": model,
        "started_at": time.time(),
        "capacity": 4,
        "running": 0,
        "jobs": [],
        "draining": False,
        **extra,
    }


async def _scans(redis: Redis) -> int:
    stats: dict[str, Any] = await redis.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_registry_lists_workers_and_drops_an_expired_one(redis: Redis) -> None:
    ids = [f"reg-{time.time_ns()}-{n}" for n in range(3)]
    await fleet.register(redis, _worker(ids[0]), 60_000)
    await fleet.register(redis, _worker(ids[1]), 60_000)
    await fleet.register(redis, _worker(ids[2]), 300)  # misses its next beat
    try:
        assert set(ids) <= {w["id"] for w in await fleet.live_workers(redis)}
        deadline = time.monotonic() + 10
        while ids[2] in {w["id"] for w in await fleet.live_workers(redis)}:
            assert time.monotonic() < deadline, "an expired worker is still listed"
            await asyncio.sleep(0.05)
        assert {ids[0], ids[1]} <= {w["id"] for w in await fleet.live_workers(redis)}
        # Its index member goes once its expiry is PRUNE_AFTER_MS old (moved there, not waited for).
        assert await redis.zscore(keys.WORKER_INDEX, ids[2]) is not None
        stale = int(time.time() * 1000) - fleet.PRUNE_AFTER_MS - 1
        await redis.zadd(keys.WORKER_INDEX, {ids[2]: stale})
        await fleet.live_workers(redis)
        assert await redis.zscore(keys.WORKER_INDEX, ids[2]) is None
        # A clean stop leaves at once: entry and member.
        await fleet.deregister(redis, ids[1])
        assert ids[1] not in {w["id"] for w in await fleet.live_workers(redis)}
        assert await redis.zscore(keys.WORKER_INDEX, ids[1]) is None
        assert not await redis.exists(keys.worker_key(ids[1]))
    finally:
        for worker_id in ids:
            await fleet.deregister(redis, worker_id)


async def test_registry_reads_no_scan_and_finds_an_unindexed_worker_by_id(redis: Redis) -> None:
    # A worker older than the index writes only its entry: not listed, but found when named (the reaper).
    old = f"old-{time.time_ns()}"
    await redis.set(keys.worker_key(old), json.dumps(_worker(old)), px=60_000)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(2000):  # other keys in the keyspace, as job event streams are
            pipe.xadd(keys.events_stream(f"job_reg_{n}"), {"e": "token"})
        await pipe.execute()
    try:
        scans = await _scans(redis)
        assert old not in {w["id"] for w in await fleet.live_workers(redis)}
        assert old in {w["id"] for w in await fleet.live_workers(redis, also=[old])}
        assert await _scans(redis) == scans
    finally:
        await redis.delete(keys.worker_key(old), *(keys.events_stream(f"job_reg_{n}") for n in range(2000)))


@pytest.fixture(scope="module")
def token_api(stack: Stack, model_dir: Path) -> Iterator[str]:
    """An API with INFERQ_METRICS_TOKEN set, that also takes jobs for OTHER."""
    url, api = start_api(
        stack, INFERQ_METRICS_TOKEN=TOKEN, INFERQ_EXTRA_MODELS=json.dumps({OTHER: str(model_dir)})
    )
    try:
        yield url
    finally:
        api.stop()


async def test_metrics_token_guards_the_api_metrics(
    token_api: str, client: httpx.AsyncClient, stack: Stack
) -> None:
    async with httpx.AsyncClient(base_url=token_api, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            refused = await c.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["error"]["message"] == METRICS_TOKEN_REQUIRED
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "inferq:" not in refused.text
        ok = await c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "inferq:num_requests_waiting" in ok.text
    assert (await client.get("/metrics")).status_code == 200  # no token set: open, as before


def test_metrics_token_guards_a_worker_metrics() -> None:
    guarded = worker_metrics.serve(_free_port(), "127.0.0.1", SecretStr(TOKEN))
    unguarded = worker_metrics.serve(_free_port(), "127.0.0.1", None)
    assert guarded is not None and unguarded is not None
    try:
        url = f"http://127.0.0.1:{guarded.server_port}/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.get(url, headers=headers, timeout=10)
            assert refused.status_code == 401
            assert refused.json()["error"]["message"] == METRICS_TOKEN_REQUIRED
            assert "inferq:" not in refused.text
        ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert ok.status_code == 200 and "inferq:generation_tokens" in ok.text
        assert httpx.get(f"http://127.0.0.1:{unguarded.server_port}/metrics", timeout=10).status_code == 200
    finally:
        for server in (guarded, unguarded):
            server.shutdown()
            server.server_close()


def _gauge(text: str, name: str, labels: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(f"{name}{{{labels}}} "))
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_and_a_queued_job_poll_scan_nothing(token_api: str, redis: Redis) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    fake = f"fake-{time.time_ns()}"
    await fleet.register(redis, _worker(fake, tokens_per_s=50.0, tokens_per_s_peak=50.0), 120_000)
    async with httpx.AsyncClient(base_url=token_api, timeout=30) as c:
        made = [
            (await c.post("/v1/jobs", json={"model": OTHER, "messages": FRANCE, "max_tokens": 4})).json()
            for _ in range(2)
        ]
        try:
            scans = await _scans(redis)
            for _ in range(3):
                polled = await c.get(f"/v1/jobs/{made[1]['id']}")
                assert polled.status_code == 200 and polled.json()["status"] == "queued"
                assert polled.json()["queue_position"] == 2  # the registry was read: OTHER has a worker
                scraped = await c.get("/metrics", headers=auth)
                assert scraped.status_code == 200
            assert await _scans(redis) == scans, "a scrape or a poll ran a SCAN"
            text = scraped.text
            waiting = f'model_name="{OTHER}",queue="interactive"'
            assert _gauge(text, "inferq:num_requests_waiting", waiting) == 2
            assert _gauge(text, "inferq:workers_alive", f'model_name="{OTHER}"') == 1
            # A job a worker holds stays in arq's queue until it ends: it counts as running, not waiting.
            held = _worker(fake, running=1, jobs=[made[0]["id"]], tokens_per_s=50.0, tokens_per_s_peak=50.0)
            await fleet.register(redis, held, 120_000)
            text = (await c.get("/metrics", headers=auth)).text
            assert _gauge(text, "inferq:num_requests_waiting", waiting) == 1
            assert _gauge(text, "inferq:num_requests_running", f'model_name="{OTHER}"') == 1
            assert "tenant" not in text
        finally:
            for job in made:
                await c.post(f"/v1/jobs/{job['id']}/cancel")
            await fleet.deregister(redis, fake)


async def test_reaper_keeps_the_jobs_of_a_beating_worker_missing_from_the_index(
    stack: Stack, servers: Servers, redis: Redis, client: httpx.AsyncClient
) -> None:
    # A worker older than the index (a rolling upgrade) writes only its entry. While it beats, its running
    # job stays its own; once it stops, the job is reclaimed as any dead worker's.
    old = f"old-worker-{time.time_ns()}"
    job_id = new_job_id()
    await redis.set(keys.worker_key(old), json.dumps(_worker(old, running=1, jobs=[job_id])), px=120_000)
    row = {
        "id": job_id,
        "status": "running",
        "model": OTHER,  # no worker serves it: once reclaimed, the job waits in the queue
        "request": {"messages": FRANCE, "max_tokens": 4},
        "prompt_tokens": 8,
        "attempts": 1,
        "worker_id": old,
    }
    engine = create_engine(servers.database_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(Job), [row])

        async def status() -> str:
            async with engine.connect() as conn:
                return str((await conn.execute(select(Job.status).where(Job.id == job_id))).scalar_one())

        def warned() -> bool:
            logs = Path(stack.api.log_dir).glob("api-*.log")
            return any(old in log.read_text(errors="replace") for log in logs)

        deadline = time.monotonic() + 30
        while not warned():  # the reaper has seen the worker, alive though not indexed
            assert time.monotonic() < deadline, "the reaper never noticed the unindexed worker"
            assert await status() == "running"
            await asyncio.sleep(0.1)
        # Twice the reaper's grace (2 s) and a tick: a worker taken for dead would have lost its job by now.
        watch = time.monotonic() + 5
        while time.monotonic() < watch:
            assert await status() == "running", "the job of a beating worker was reclaimed"
            await asyncio.sleep(0.2)
        await redis.delete(keys.worker_key(old))  # it stops beating
        deadline = time.monotonic() + 30
        while await status() != "queued":
            assert time.monotonic() < deadline, "the job of a dead worker was not reclaimed"
            await asyncio.sleep(0.1)
    finally:
        await redis.delete(keys.worker_key(old))
        await client.post(f"/v1/jobs/{job_id}/cancel")
        await engine.dispose()
