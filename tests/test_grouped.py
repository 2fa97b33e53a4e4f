"""Group commit of submissions: concurrent callers share round trips, each gets its own outcome, and a
row Postgres refuses fails only its own caller."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import select

from api.jobs.inserts import insert_jobs
from shared.db import create_engine
from shared.grouped import Grouped
from shared.models import Job, new_job_id
from tests.conftest import Stack

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_items_handed_in_during_a_round_trip_go_out_together() -> None:
    groups: list[list[int]] = []

    async def run(items: list[int]) -> list[int | BaseException]:
        groups.append(items)
        await asyncio.sleep(0.05)
        return [ValueError(i) if i == 3 else i * 10 for i in items]

    grouped: Grouped[int, int] = Grouped(run)
    first = asyncio.create_task(grouped(0))
    await asyncio.sleep(0.01)  # the first item is in flight alone
    rest = [asyncio.create_task(grouped(i)) for i in range(1, 6)]
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert groups == [[0], [1, 2, 3, 4, 5]]
    assert results[:2] == [10, 20] and results[3:] == [40, 50]
    assert isinstance(results[2], ValueError)


async def test_a_failing_round_trip_fails_every_caller_of_its_group_only() -> None:
    calls = 0

    async def run(items: list[str]) -> list[str | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return items

    grouped: Grouped[str, str] = Grouped(run)
    with pytest.raises(ConnectionError):
        await grouped("a")
    assert await grouped("b") == "b"


def _row(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": new_job_id(),
        "status": "queued",
        "model": "m",
        "request": {"prompt": "x", "max_tokens": 1},
        "metadata_": None,
        "prompt_tokens": 1,
        "attempts": 0,
        "tenant": None,
        "api_key_id": None,
        "request_id": None,
    }
    row.update(over)
    return row


async def test_one_insert_stores_many_jobs_in_order_and_a_refused_row_fails_alone(stack: Stack) -> None:
    db = create_engine(stack.servers.database_url)
    try:
        rows = [_row() for _ in range(5)]
        rows[2]["status"] = "bogus"  # violates ck_jobs_status
        outcomes = await insert_jobs(db, rows)
        assert isinstance(outcomes[2], Exception)
        created = [o for i, o in enumerate(outcomes) if i != 2]
        assert all(not isinstance(o, BaseException) for o in created)
        good = [rows[i]["id"] for i in range(5) if i != 2]
        async with db.connect() as conn:
            stored = dict((await conn.execute(select(Job.id, Job.created_at).where(Job.id.in_(good)))).all())
            refused = (await conn.execute(select(Job.id).where(Job.id == rows[2]["id"]))).first()
        assert refused is None
        assert [stored[i] for i in good] == created

        together = [_row() for _ in range(4)]
        times = await insert_jobs(db, together)
        assert times == sorted(times) and len(set(times)) == 4  # clock_timestamp(): distinct, in order
    finally:
        await db.dispose()


async def test_concurrent_submissions_are_all_stored_and_queued(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        body = {"prompt": "Count: 1, 2,", "max_tokens": 2}
        responses = await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(40)))
        assert [r.status_code for r in responses] == [202] * 40
        ids = [r.json()["id"] for r in responses]
        assert len(set(ids)) == 40
        for job_id in ids:
            for _ in range(300):
                job = (await client.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] == "succeeded":
                    break
                await asyncio.sleep(0.1)
            assert job["status"] == "succeeded", job
