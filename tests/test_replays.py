"""What a job's stream showed is what it keeps: an n > 1 job whose Redis events are gone replays every
output from Postgres, and a job stopped outside its worker (the reaper's cancel, a deadline or a cancel
while it waits to be retried) stores the text its token events carried, per output."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import redis.asyncio as aioredis

from shared import keys
from shared.events import CHOICE, CHOICES
from tests.conftest import Stack
from tests.helpers import STORY, choice_texts, iter_sse, read_sse, submit, wait_job


async def test_replay_of_an_n2_job_without_its_redis_events_has_every_choice(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    created = await submit(client, messages=STORY, max_tokens=12, temperature=1.0, seed=5, n=2)
    job = await wait_job(client, created["id"])
    live = await read_sse(client, created["id"])
    texts = choice_texts(live, 2)
    assert all(texts) and texts == [c["text"] for c in job["choices"]]
    r = aioredis.from_url(stack.servers.redis_url)
    try:
        assert await r.delete(keys.events_stream(created["id"])) == 1
    finally:
        await r.aclose()

    replay = await read_sse(client, created["id"])
    tokens = [e for e in replay if e.event == "token"]
    assert [e.data[CHOICE] for e in tokens] == [0, 1]
    assert [e.data["index"] for e in tokens] == [0, 1]
    assert choice_texts(replay, 2) == texts
    assert replay[-1].event == "done" and live[-1].event == "done"
    assert replay[-1].data[CHOICES] == live[-1].data[CHOICES]
    assert replay[-1].data["usage"] == live[-1].data["usage"]


async def _running_with_text(client: httpx.AsyncClient, n: int, **body: Any) -> tuple[str, int]:
    """A job that runs and has published text for each of its outputs; its id and events seen."""
    created = await submit(client, messages=STORY, max_tokens=400, temperature=0, n=n, **body)
    seen: list[Any] = []
    async for event in iter_sse(client, created["id"]):
        seen.append(event)
        if all(len(t) >= 3 for t in choice_texts(seen, n)):
            return created["id"], len(seen)
    raise AssertionError(f"job {created['id']} ended before it had text: {seen}")


async def _stored_is_streamed(client: httpx.AsyncClient, job: dict[str, Any], n: int) -> list[str]:
    events = await read_sse(client, job["id"])
    texts = choice_texts(events, n)
    stored = [c["text"] for c in job["choices"]] if n > 1 else [job["output"]]
    assert stored == texts, (job, events)
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == job["finish_reason"]
    if n > 1:
        assert [c["index"] for c in events[-1].data[CHOICES]] == list(range(n))
    return texts


async def test_jobs_stopped_while_their_worker_is_lost_keep_the_text_they_published(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    """Three jobs run on a worker that freezes: one is cancelled while it is frozen (the reaper ends it),
    one has a deadline that passes once the reaper has handed it back (the deadline duty ends it), one
    is cancelled once handed back (the cancel route ends it). Each keeps what its stream had shown."""
    reaped, _ = await _running_with_text(client, 2)
    waiting, _ = await _running_with_text(client, 1)
    # Frozen before its worker's timer stops it; its deadline passes once it waits to be retried.
    expiring, _ = await _running_with_text(client, 2, cancel_after="8s")
    stack.worker.send(signal.SIGSTOP)
    try:
        # The worker is frozen: the cancel waits its few seconds for it, then leaves it to the reaper.
        resp = await client.post(f"/v1/jobs/{reaped}/cancel")
        assert resp.status_code in (200, 202), resp.text
        deadline = time.monotonic() + 30
        while (await client.get(f"/v1/jobs/{waiting}")).json()["status"] != "queued":
            assert time.monotonic() < deadline, "the reaper never handed the frozen worker's job back"
            await asyncio.sleep(0.1)
        resp = await client.post(f"/v1/jobs/{waiting}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
        ends = [await wait_job(client, job_id, timeout=30) for job_id in (reaped, expiring, waiting)]
    finally:
        stack.worker.send(signal.SIGCONT)
    reaped_job, expired_job, waiting_job = ends
    assert reaped_job["status"] == "cancelled" and reaped_job["finish_reason"] == "cancelled"
    assert expired_job["status"] == "cancelled" and expired_job["finish_reason"] == "timeout"
    assert waiting_job["status"] == "cancelled" and waiting_job["attempts"] == 1
    for job, n in ((reaped_job, 2), (expired_job, 2), (waiting_job, 1)):
        texts = await _stored_is_streamed(client, job, n)
        assert all(len(t) >= 3 for t in texts), job
        assert job["usage"]["completion_tokens"] > 0, job
