"""SSE: tokens equal the stored output, Last-Event-ID resumes exactly, finished jobs replay, one pub/sub."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis

from shared import keys
from tests.conftest import Stack
from tests.helpers import FRANCE, STORY, iter_sse, read_sse, submit, tokens_text, wait_job


async def test_sse_tokens_concatenate_to_the_stored_output(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0)
    events = await read_sse(client, created["id"])
    job = (await client.get(f"/v1/jobs/{created['id']}")).json()

    assert events[0].event == "status" and events[0].data["status"] == "running"
    assert events[-1].event == "done"
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    tokens = [e for e in events if e.event == "token"]
    assert [t.data["index"] for t in tokens] == list(range(len(tokens)))
    assert tokens_text(events) == job["output"]
    assert "Paris" in job["output"]
    done = events[-1].data
    assert done["finish_reason"] == "stop"
    assert done["usage"] == job["usage"]
    assert done["timings"]["ttft_ms"] == job["timings"]["ttft_ms"]


async def test_sse_resume_with_last_event_id_yields_exactly_the_rest(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0)
    full = await read_sse(client, created["id"])
    assert len(full) >= 4
    for k in (1, 3, len(full) - 1):
        rest = await read_sse(client, created["id"], headers={"Last-Event-ID": str(k)})
        assert [(e.id, e.event, e.data) for e in rest] == [(e.id, e.event, e.data) for e in full[k:]]
    by_query = await read_sse(client, created["id"], params={"after": 2})
    assert [e.id for e in by_query] == [e.id for e in full[2:]]
    # Resumed after its last event (a browser's EventSource reconnecting after `done`): the stream
    # ends at once with nothing, rather than sending the end again.
    t0 = asyncio.get_running_loop().time()
    assert await read_sse(client, created["id"], headers={"Last-Event-ID": str(full[-1].id)}) == []
    assert asyncio.get_running_loop().time() - t0 < 2


async def test_sse_resume_mid_stream_while_running(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=STORY, max_tokens=40, temperature=0)
    first: list[int] = []
    async for event in iter_sse(client, created["id"]):
        first.append(event.id)
        if event.event == "token" and event.data["index"] == 2:
            break  # the client drops the connection mid-stream
    rest = await read_sse(client, created["id"], headers={"Last-Event-ID": str(first[-1])})
    ids = first + [e.id for e in rest]
    assert ids == list(range(1, len(ids) + 1))
    assert rest[-1].event == "done"


async def test_sse_of_a_finished_job_replays_everything(client: httpx.AsyncClient) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0)
    job = await wait_job(client, created["id"])
    events = await read_sse(client, created["id"])
    assert events[0].event == "status"
    assert events[-1].event == "done"
    assert tokens_text(events) == job["output"]


async def test_sse_replays_from_postgres_when_redis_events_expired(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    created = await submit(client, messages=FRANCE, max_tokens=32, temperature=0)
    job = await wait_job(client, created["id"])
    r = aioredis.Redis.from_url(stack.servers.redis_url)
    await r.delete(keys.events_stream(created["id"]))
    await r.aclose()
    events = await read_sse(client, created["id"])
    assert [e.event for e in events] == ["status", "token", "done"]
    assert tokens_text(events) == job["output"]
    assert events[-1].data["usage"] == job["usage"]


async def test_sse_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/jobs/job_nope/events")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"


async def test_all_streams_of_an_api_process_share_one_pubsub_connection(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    r = aioredis.Redis.from_url(stack.servers.redis_url)
    before = len(await r.client_list(_type="pubsub"))
    created = [await submit(client, messages=STORY, max_tokens=30, temperature=0) for _ in range(5)]
    seen = asyncio.Event()
    opened = 0

    async def consume(job_id: str) -> list[str]:
        nonlocal opened
        out = []
        async for e in iter_sse(client, job_id):
            if not out:
                opened += 1
                if opened == 5:
                    seen.set()
            out.append(e.event)
        return out

    tasks = [asyncio.create_task(consume(c["id"])) for c in created]
    await asyncio.wait_for(seen.wait(), 60)
    during = len(await r.client_list(_type="pubsub"))
    results = await asyncio.gather(*tasks)
    await r.aclose()
    assert during == before  # five live streams, no new pub/sub connection
    assert all(res[-1] == "done" for res in results)
