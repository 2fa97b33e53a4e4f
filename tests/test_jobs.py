"""Submit, run, poll, list: the core pipeline end to end with the real demo model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shared import keys
from shared.db import async_url
from tests.conftest import Stack, start_api
from tests.helpers import FRANCE, read_sse, submit, wait_job


async def test_job_capital_of_france_succeeds_with_usage_and_timings(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0, metadata={"order": 7})
    assert created["status"] == "queued"
    assert created["urls"]["events"] == f"/v1/jobs/{created['id']}/events"

    job = await wait_job(client, created["id"])

    assert job["status"] == "succeeded"
    assert "Paris" in job["output"]
    assert job["finish_reason"] == "stop"
    assert job["usage"]["prompt_tokens"] > 5
    assert 0 < job["usage"]["completion_tokens"] <= 32
    assert job["usage"]["total_tokens"] == job["usage"]["prompt_tokens"] + job["usage"]["completion_tokens"]
    timings = job["timings"]
    assert all(timings[k] is not None and timings[k] >= 0 for k in ("queue_ms", "ttft_ms", "total_ms"))
    assert timings["queue_ms"] <= timings["ttft_ms"] <= timings["total_ms"]
    assert timings["tokens_per_s"] > 0
    assert job["attempts"] == 1
    assert job["worker_id"]
    assert job["started_at"] and job["finished_at"]
    assert job["metadata"] == {"order": 7}  # kept with the job


async def test_prompt_job_and_max_tokens_length_finish(client: httpx.AsyncClient) -> None:
    created = await submit(client, prompt="Once upon a time", max_tokens=5, temperature=0)
    job = await wait_job(client, created["id"])
    assert job["status"] == "succeeded"
    assert job["usage"]["completion_tokens"] == 5
    assert job["finish_reason"] == "length"


async def test_stop_string_ends_generation_and_is_not_in_output(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0, stop=["Paris"])
    job = await wait_job(client, created["id"])
    assert job["status"] == "succeeded"
    assert job["finish_reason"] == "stop"
    assert job["output"] == "The capital of France is "


async def test_sampled_job_runs_with_top_p_top_k(client: httpx.AsyncClient) -> None:
    created = await submit(
        client, messages=FRANCE, max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=3
    )
    job = await wait_job(client, created["id"])
    assert job["status"] == "succeeded"
    assert job["output"]


async def test_eight_concurrent_jobs_share_engine_steps(client: httpx.AsyncClient) -> None:
    prompts = [f"Count from 1 to {n} in words." for n in range(5, 13)]
    created = await asyncio.gather(
        *(
            submit(client, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0)
            for p in prompts
        )
    )
    jobs = await asyncio.gather(*(wait_job(client, c["id"]) for c in created))
    assert all(j["status"] == "succeeded" for j in jobs)
    # The engine reports how many requests shared a step with each job.
    assert max(j["peak_batch_size"] for j in jobs) >= 4
    assert all(j["peak_batch_size"] > 1 for j in jobs)


async def test_list_jobs_newest_first_with_cursor(client: httpx.AsyncClient) -> None:
    ids = [(await submit(client, prompt=f"Say {i}", max_tokens=1, temperature=0))["id"] for i in range(3)]
    await asyncio.gather(*(wait_job(client, i) for i in ids))

    first = (await client.get("/v1/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    second = (await client.get("/v1/jobs", params={"limit": 1, "after": first["next_after"]})).json()
    assert [j["id"] for j in second["data"]] == [ids[0]]

    succeeded = (await client.get("/v1/jobs", params={"status": "succeeded", "limit": 100})).json()
    assert {j["status"] for j in succeeded["data"]} == {"succeeded"}
    assert set(ids) <= {j["id"] for j in succeeded["data"]}


async def test_health_ready_and_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] == "ok" and ready.json()["postgres"] == "ok"
    assert (await client.get("/docs")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/jobs/{job_id}/events" in schema["paths"]


async def test_prefer_wait_returns_the_finished_job_in_one_request(client: httpx.AsyncClient) -> None:
    body = {"messages": FRANCE, "max_tokens": 16, "temperature": 0}
    resp = await client.post("/v1/jobs", json=body, headers={"Prefer": "wait=30"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["preference-applied"] == "wait=30" and "retry-after" not in resp.headers
    job = resp.json()
    assert job["status"] == "succeeded" and "Paris" in job["output"] and job["usage"]["completion_tokens"]


async def test_prefer_wait_on_a_longer_job_returns_202_then_get_waits_for_the_end(
    client: httpx.AsyncClient,
) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 80, "temperature": 0}
    resp = await client.post("/v1/jobs", json=body, headers={"Prefer": "respond-async, wait=1"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] in ("queued", "running") and resp.headers["retry-after"] in ("1", "2", "3")
    polled = await client.get(f"/v1/jobs/{job['id']}")
    if polled.json()["status"] in ("queued", "running"):
        assert polled.headers["retry-after"].isdigit()  # a plain poll says when to come back
    waited = await client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=60"})
    assert waited.status_code == 200 and waited.json()["status"] == "succeeded", waited.text
    assert waited.headers["preference-applied"] == "wait=60" and "retry-after" not in waited.headers


async def test_prefer_wait_holds_no_database_connection_while_it_waits(client: httpx.AsyncClient) -> None:
    # More waiting clients than the API's pool has connections (10 + 10 overflow): each waits on the
    # job's events, and the API keeps answering everyone else at once.
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 40, "temperature": 0}
    job = (await client.post("/v1/jobs", json=body)).json()
    waiters = [
        asyncio.create_task(client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=60"}, timeout=90))
        for _ in range(40)
    ]
    await asyncio.sleep(1)
    t0 = time.monotonic()
    listed = await client.get("/v1/jobs", params={"limit": 5})
    assert listed.status_code == 200 and time.monotonic() - t0 < 5, listed.text
    for waited in await asyncio.gather(*waiters):
        assert waited.status_code == 200 and waited.json()["status"] == "succeeded", waited.text


async def test_prefer_wait_out_of_range_or_malformed_is_a_400_and_creates_nothing(
    client: httpx.AsyncClient,
) -> None:
    async def newest() -> list[str]:
        return [j["id"] for j in (await client.get("/v1/jobs", params={"limit": 1})).json()["data"]]

    before = await newest()
    for value in ("wait=0", "wait=61", "wait=abc", "wait=-3", "wait=1.5"):
        body = {"prompt": "Hi", "max_tokens": 1}
        resp = await client.post("/v1/jobs", json=body, headers={"Prefer": value})
        assert resp.status_code == 400, (value, resp.text)
        error = resp.json()["error"]
        assert error["param"] == "Prefer" and "wait" in error["message"], error
    assert await newest() == before
    missing = await client.get("/v1/jobs/job_000000000000000000000000", headers={"Prefer": "wait=5"})
    assert missing.status_code == 404


async def test_delete_job_keeps_a_tombstone_with_usage_and_removes_the_text_everywhere(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=16, temperature=0, metadata={"who": "me"})
    done = await wait_job(client, created["id"])
    assert "Paris" in done["output"]
    removed = await client.delete(f"/v1/jobs/{created['id']}")
    assert removed.status_code == 200, removed.text
    job = removed.json()
    assert job["data_removed"] is True and job["output"] is None and job["metadata"] is None
    assert (
        job["status"] == "succeeded" and job["usage"] == done["usage"] and job["timings"] == done["timings"]
    )
    assert "messages" not in job["request"] and job["request"]["max_tokens"] == 16
    # Nothing of the text is left: not in Postgres, not in Redis, not in the SSE replay.
    engine = create_async_engine(async_url(stack.servers.database_url))
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT request::text, output FROM jobs WHERE id = :id"), {"id": created["id"]}
            )
        ).one()
    await engine.dispose()
    assert "capital" not in row[0] and row[1] is None
    r = aioredis.from_url(stack.servers.redis_url)
    assert not await r.exists(keys.events_stream(created["id"]))
    await r.aclose()
    events = await read_sse(client, created["id"])
    assert [e.event for e in events] == ["status", "done"] and "Paris" not in json.dumps(
        [e.data for e in events]
    )
    assert (await client.delete("/v1/jobs/job_0123456789abcdef01234567")).status_code == 404


async def test_retention_period_clears_jobs_finished_long_enough_ago(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    old = await wait_job(client, (await submit(client, messages=FRANCE, max_tokens=4))["id"])
    new = await wait_job(client, (await submit(client, messages=FRANCE, max_tokens=4))["id"])
    engine = create_async_engine(async_url(stack.servers.database_url))
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE jobs SET finished_at = now() - interval '2 minutes' WHERE id = :id"),
            {"id": old["id"]},
        )
    await engine.dispose()
    url, api = start_api(stack, INFERQ_RETENTION__SECONDS="60", INFERQ_RETENTION__TICK_SECONDS="0.5")
    try:
        deadline = time.monotonic() + 30
        while not (await client.get(f"/v1/jobs/{old['id']}")).json()["data_removed"]:
            assert time.monotonic() < deadline, "the retention duty did not clear the old job"
            await asyncio.sleep(0.25)
    finally:
        api.stop()
    assert (await client.get(f"/v1/jobs/{old['id']}")).json()["output"] is None
    kept = (await client.get(f"/v1/jobs/{new['id']}")).json()
    assert kept["data_removed"] is False and kept["output"] == new["output"]
