"""Submit, run, poll, list: the core pipeline end to end with the real demo model."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import FRANCE, submit, wait_job


async def test_job_capital_of_france_succeeds_with_usage_and_timings(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0)
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
