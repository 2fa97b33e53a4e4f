"""A worker restarted mid-job: the job runs again, continuing the text it had published, and ends with
exactly one result."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import httpx
from sqlalchemy import func, make_url, select
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db import async_url
from shared.events import Event, text_of
from shared.models import Job
from tests.conftest import REPO, Stack
from tests.helpers import STORY, iter_sse, read_sse, submit, wait_job


async def test_restarting_the_worker_mid_job_still_succeeds_with_one_result(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = {"messages": STORY, "max_tokens": 48, "temperature": 0}
    created = await submit(client, **body)
    async for event in iter_sse(client, created["id"]):
        if event.event == "token" and event.data["index"] >= 2:
            break
    await asyncio.to_thread(stack.restart_worker, signal.SIGTERM)

    job = await wait_job(client, created["id"])
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2

    events = await read_sse(client, created["id"])
    statuses = [e.data for e in events if e.event == "status"]
    assert [s["status"] for s in statuses] == ["running", "queued", "running"]
    assert statuses[1]["reason"] == "worker_shutdown"
    assert statuses[2]["attempt"] == 2
    assert [e.event for e in events].count("done") == 1
    # The second attempt continues from the text the first had published: that text stands, and the
    # second attempt's tokens complete it.
    restart_seq = next(e.id for e in events if e.event == "status" and e.data["attempt"] == 2)
    before = "".join(e.data["text"] for e in events if e.event == "token" and e.id < restart_seq)
    after = "".join(e.data["text"] for e in events if e.event == "token" and e.id > restart_seq)
    assert before and statuses[2]["resume_from_chars"] == len(before)
    assert statuses[0]["resume_from_chars"] == 0
    assert before + after == job["output"] == text_of([Event(e.id, e.event, e.data) for e in events])
    assert job["usage"]["completion_tokens"] <= body["max_tokens"]

    # Greedy decoding: the continued job's output equals a fresh run of the same request.
    fresh = await wait_job(client, (await submit(client, **body))["id"])
    assert fresh["output"] == job["output"]

    engine = create_async_engine(async_url(stack.servers.database_url))
    async with engine.connect() as conn:
        rows = await conn.scalar(select(func.count()).select_from(Job).where(Job.id == created["id"]))
    await engine.dispose()
    assert rows == 1


async def test_restarting_the_worker_mid_job_continues_each_of_n_outputs_with_its_logprobs(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = {"messages": STORY, "max_tokens": 40, "temperature": 0.9, "n": 2, "logprobs": True}
    created = await submit(client, **body)
    async for event in iter_sse(client, created["id"]):
        if event.event == "token" and event.data["index"] >= 4:
            break
    await asyncio.to_thread(stack.restart_worker, signal.SIGTERM)

    job = await wait_job(client, created["id"])
    assert job["status"] == "succeeded" and job["attempts"] == 2
    events = [Event(e.id, e.event, e.data) for e in await read_sse(client, created["id"])]
    restart = next(e for e in events if e.event == "status" and e.data.get("attempt") == 2)
    for i, choice in enumerate(job["choices"]):
        before = text_of([e for e in events if e.seq < restart.seq], i)
        assert restart.data["resume_from_chars_by_choice"][i] == len(before)
        assert choice["text"].startswith(before) and choice["text"] == text_of(events, i)
        # The logprobs of the text the first attempt published are kept, and the second's follow them.
        assert "".join(e["token"] for e in choice["logprobs"]) == choice["text"]
    assert job["output"] == job["choices"][0]["text"]


async def test_api_refuses_to_start_on_an_unmigrated_database(stack: Stack) -> None:
    from tests.conftest import _admin

    url = stack.servers.database_url
    empty = make_url(url).set(database="inferq_empty_check").render_as_string(hide_password=False)
    await _admin(url, "DROP DATABASE IF EXISTS inferq_empty_check")
    await _admin(url, "CREATE DATABASE inferq_empty_check")
    try:
        env = {**stack.api.env, "INFERQ_DATABASE_URL": empty}
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "inferq.cli", "api", "--port", "1"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        await _admin(url, "DROP DATABASE IF EXISTS inferq_empty_check WITH (FORCE)")
    assert done.returncode != 0
    assert "run `inferq migrate`" in done.stdout + done.stderr
