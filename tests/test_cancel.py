"""Cancellation: running jobs stop mid-generation, queued jobs never run, finished jobs are 409."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from tests.conftest import Stack
from tests.helpers import STORY, iter_sse, read_sse, submit, tokens_text, wait_job


async def test_cancel_running_job_stops_within_a_second_and_keeps_partial_output(
    client: httpx.AsyncClient,
) -> None:
    created = await submit(client, messages=STORY, max_tokens=400, temperature=0)
    streamed: list[str] = []
    async for event in iter_sse(client, created["id"]):
        if event.event == "token":
            streamed.append(event.data["text"])
            if len(streamed) == 3:
                break

    t0 = time.monotonic()
    resp = await client.post(f"/v1/jobs/{created['id']}/cancel")
    elapsed = time.monotonic() - t0

    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert elapsed < 1.0
    assert job["status"] == "cancelled"
    assert job["finish_reason"] == "cancelled"
    assert job["output"].startswith("".join(streamed))
    assert 3 <= job["usage"]["completion_tokens"] < 400
    events = await read_sse(client, created["id"])
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "cancelled"
    assert tokens_text(events) == job["output"]
    # The engine dropped it: nothing more is written after the cancel.
    await asyncio.sleep(0.5)
    again = (await client.get(f"/v1/jobs/{created['id']}")).json()
    assert again["output"] == job["output"] and again["status"] == "cancelled"


async def test_cancel_queued_job_means_it_never_runs(client: httpx.AsyncClient, stack: Stack) -> None:
    stack.worker.send(signal.SIGSTOP)  # the worker is frozen, so the job stays queued
    try:
        created = await submit(client, messages=STORY, max_tokens=50, temperature=0)
        resp = await client.post(f"/v1/jobs/{created['id']}/cancel")
        assert resp.status_code == 200
        assert resp.json()["status"] == "cancelled"
    finally:
        stack.worker.send(signal.SIGCONT)
    # Give the worker time to see (and skip) anything left in the queue, then prove it never ran.
    probe = await submit(client, prompt="Hi", max_tokens=2, temperature=0)
    await wait_job(client, probe["id"])
    job = (await client.get(f"/v1/jobs/{created['id']}")).json()
    assert job["status"] == "cancelled"
    assert job["attempts"] == 0 and job["started_at"] is None and job["worker_id"] is None
    assert job["output"] == ""
    events = await read_sse(client, created["id"])
    assert [e.event for e in events] == ["done"]


async def test_cancel_finished_job_is_409(client: httpx.AsyncClient) -> None:
    created = await submit(client, prompt="Hi", max_tokens=2, temperature=0)
    await wait_job(client, created["id"])
    resp = await client.post(f"/v1/jobs/{created['id']}/cancel")
    assert resp.status_code == 409
    assert resp.json()["error"]["type"] == "conflict_error"
    assert "already succeeded" in resp.json()["error"]["message"]


async def test_cancel_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/jobs/job_missing/cancel")
    assert resp.status_code == 404
