"""Bad input gets 400/404/413 in the error envelope and leaves no row behind."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db import async_url
from shared.models import Job
from tests.conftest import Stack
from tests.helpers import FRANCE, wait_job


async def _count_jobs(stack: Stack) -> int:
    engine = create_async_engine(async_url(stack.servers.database_url))
    async with engine.connect() as conn:
        n = int(await conn.scalar(select(func.count()).select_from(Job)) or 0)
    await engine.dispose()
    return n


def _assert_envelope(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": FRANCE, "prompt": "hi"}, None),
        ({"max_tokens": 5}, None),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"prompt": "hi", "metadata": {"x": "y" * 10_000}}, "metadata"),
        ({"prompt": "hi", "model": "gpt-17"}, "model"),
        ({"prompt": "hi", "bogus": 1}, "bogus"),
        ({"prompt": "word " * 5000}, "prompt"),
    ],
)
async def test_bad_job_bodies_are_400_and_store_nothing(
    client: httpx.AsyncClient, stack: Stack, body: dict[str, Any], param: str | None
) -> None:
    before = await _count_jobs(stack)
    error = _assert_envelope(await client.post("/v1/jobs", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert await _count_jobs(stack) == before


async def test_prompt_over_the_context_is_400_counted_in_tokens(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    before = await _count_jobs(stack)
    # ~3,000 prompt tokens are within the prompt limit (4,096) and 6,000 within the max_tokens limit the
    # test stack sets, but together they overflow the demo model's 8,192-token context.
    resp = await client.post("/v1/jobs", json={"prompt": "hello " * 3000, "max_tokens": 6000})
    error = _assert_envelope(resp, 400, "prompt")
    assert "context" in error["message"]
    assert await _count_jobs(stack) == before


async def test_malformed_json_is_400(client: httpx.AsyncClient, stack: Stack) -> None:
    before = await _count_jobs(stack)
    resp = await client.post(
        "/v1/jobs", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}
    )
    error = _assert_envelope(resp, 400)
    assert error["message"] == "request body is not valid JSON"
    assert await _count_jobs(stack) == before


async def test_two_megabyte_body_is_413(client: httpx.AsyncClient, stack: Stack) -> None:
    before = await _count_jobs(stack)
    resp = await client.post("/v1/jobs", json={"prompt": "x" * 2_000_000})
    error = _assert_envelope(resp, 413)
    assert "larger than the limit" in error["message"]
    assert await _count_jobs(stack) == before


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    resp = await client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    _assert_envelope(resp, 413)


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    error = _assert_envelope(await client.get("/v1/jobs/job_doesnotexist"), 404)
    assert error["type"] == "not_found_error"
    assert "job_doesnotexist" in error["message"]


async def test_bad_list_parameters_are_400(client: httpx.AsyncClient) -> None:
    _assert_envelope(await client.get("/v1/jobs", params={"status": "sleeping"}), 400, "status")
    _assert_envelope(await client.get("/v1/jobs", params={"limit": 0}), 400, "limit")
    _assert_envelope(await client.get("/v1/jobs", params={"after": "job_unknown"}), 400, "after")


async def test_unknown_route_uses_the_envelope(client: httpx.AsyncClient) -> None:
    _assert_envelope(await client.get("/v1/nothing-here"), 404)


async def test_nul_characters_are_400_not_a_storage_error(client: httpx.AsyncClient, stack: Stack) -> None:
    before = await _count_jobs(stack)
    for body in (
        {"prompt": "hi\u0000there"},
        {"messages": FRANCE, "stop": ["a\u0000"]},
        {"messages": FRANCE, "metadata": {"k": "\u0000"}},
    ):
        error = _assert_envelope(await client.post("/v1/jobs", json=body), 400)
        assert error["code"] == "invalid_characters"
    _assert_envelope(await client.get("/v1/jobs/a%00b"), 400)
    _assert_envelope(await client.get("/v1/jobs", params={"after": "x\u0000"}), 400)
    # An escaped backslash followed by "u0000" is ordinary text.
    ok = await client.post("/v1/jobs", json={"prompt": "a \\u0000 b", "max_tokens": 1})
    assert ok.status_code == 202, ok.text
    assert await _count_jobs(stack) == before + 1


async def test_event_ids_out_of_range_are_400(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/jobs", json={"messages": FRANCE, "max_tokens": 1})).json()
    url = f"/v1/jobs/{job['id']}/events"
    _assert_envelope(await client.get(url, params={"after": 2**64}), 400, "after")
    for header in ("²".encode("latin-1"), "1¹".encode("latin-1"), str(2**64).encode(), b"-1"):
        _assert_envelope(await client.get(url, headers={"Last-Event-ID": header}), 400, "Last-Event-ID")


async def test_extreme_sampling_values_neither_fail_nor_break_the_worker(client: httpx.AsyncClient) -> None:
    _assert_envelope(await client.post("/v1/jobs", json={"prompt": "hi", "top_k": 10**30}), 400, "top_k")
    for body in (
        {"messages": FRANCE, "max_tokens": 4, "temperature": 1e-300},  # runs greedy
        {"messages": FRANCE, "max_tokens": 4, "top_k": 2**31 - 1, "temperature": 0.5},
        {"messages": FRANCE, "max_tokens": 8, "temperature": 0},  # the engine still works after them
    ):
        resp = await client.post("/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        job = await wait_job(client, resp.json()["id"])
        assert job["status"] == "succeeded", job
    assert "Paris" in job["output"]
