"""Files and batches through the official `openai` SDK: the Batch API shape, run by the stack's worker."""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import datetime
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import Batch
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import Stack
from tests.helpers import FRANCE, STORY, submit, wait_status

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
FINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _line(custom_id: str, body: dict[str, Any], url: str = CHAT) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _chat(content: str, max_tokens: int = 6) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


async def _upload(oai: AsyncOpenAI, lines: list[Any]) -> str:
    file = await oai.files.create(file=("input.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    assert file.purpose == "batch" and file.bytes > 0
    return file.id


async def _wait_batch(
    oai: AsyncOpenAI, batch_id: str, statuses: set[str] = FINAL, timeout: float = 180
) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await oai.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        await asyncio.sleep(0.25)
    raise AssertionError(f"batch {batch_id} stayed {batch.status}")


async def _lines(oai: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await oai.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_batch_completes_with_a_result_per_custom_id(oai: AsyncOpenAI) -> None:
    questions = {f"q{i}": f"What is {i} plus {i}?" for i in range(6)}
    file_id = await _upload(oai, [_line(cid, _chat(q)) for cid, q in questions.items()])
    batch = await oai.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"run": "test"}
    )
    assert batch.status == "validating" and batch.metadata == {"run": "test"}
    done = await _wait_batch(oai, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.error_file_id is None
    results = await _lines(oai, done.output_file_id)
    assert [r["custom_id"] for r in results] == list(questions)
    for r in results:
        assert r["error"] is None
        assert r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] <= 6
    listed = await oai.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


async def test_batch_refused_line_goes_to_the_error_file_and_the_rest_completes(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    lines = [
        _line("good-1", _chat("Say hello.")),
        _line("bad", {"model": MODEL, "messages": "not a list", "max_tokens": 5}),
        _line("good-2", _chat("Say goodbye.")),
        _line("too-long", {**_chat("Hi"), "max_tokens": 10**6}),
    ]
    batch = await oai.batches.create(
        input_file_id=await _upload(oai, lines), endpoint=CHAT, completion_window="24h"
    )
    done = await _wait_batch(oai, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 2, 2)
    assert [r["custom_id"] for r in await _lines(oai, done.output_file_id)] == ["good-1", "good-2"]
    errors = await _lines(oai, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad", "too-long"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "messages"
    assert "max_tokens" in errors[1]["response"]["body"]["error"]["message"]
    # Each good line ran as an ordinary job, recorded with its batch and custom_id.
    jobs = (await client.get("/v1/jobs", params={"batch_id": batch.id})).json()["data"]
    assert sorted(j["custom_id"] for j in jobs) == ["good-1", "good-2"]
    assert {j["status"] for j in jobs} == {"succeeded"}


async def test_batch_with_an_unusable_file_fails_naming_the_lines(oai: AsyncOpenAI, stack: Stack) -> None:
    # Uploads are checked now (tests/test_files.py); a file stored before that was not, so the batch
    # checks again. Such a file is made by rewriting a checked one in place.
    file_id = await _upload(oai, [_line("a", _chat("x"))])
    lines: list[Any] = [
        _line("a", _chat("x")),
        "{not json",
        _line("a", _chat("y")),
        {**_line("c", _chat("z")), "url": "/v1/embeddings"},
    ]
    engine = create_async_engine(stack.servers.database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE files SET content = :content WHERE id = :id"),
            {"id": file_id, "content": _jsonl(lines)},
        )
    await engine.dispose()
    batch = await oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    done = await _wait_batch(oai, batch.id)
    assert done.status == "failed"
    assert done.errors is not None and done.errors.data is not None
    assert [(e.line, e.code) for e in done.errors.data] == [
        (2, "invalid_json"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
    ]
    assert done.output_file_id is None


async def test_batch_for_another_endpoint_than_its_file_fails(oai: AsyncOpenAI) -> None:
    file_id = await _upload(oai, [_line("p", {"model": MODEL, "prompt": "x"}, url="/v1/completions")])
    batch = await oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    done = await _wait_batch(oai, batch.id)
    assert done.status == "failed"
    assert done.errors is not None and done.errors.data is not None
    assert [(e.line, e.code, e.message) for e in done.errors.data] == [
        (1, "invalid_url", f"url must be the batch's endpoint '{CHAT}'")
    ]


async def test_batch_cancel_stops_its_jobs_and_keeps_finished_results(oai: AsyncOpenAI) -> None:
    lines = [_line(f"s{i}", _chat(STORY[0]["content"], max_tokens=400)) for i in range(40)]
    batch = await oai.batches.create(
        input_file_id=await _upload(oai, lines), endpoint=CHAT, completion_window="24h"
    )
    await _wait_batch(oai, batch.id, {"in_progress"})
    cancelling = await oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await _wait_batch(oai, batch.id, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at is not None
    errors = await _lines(oai, done.error_file_id)
    assert len(errors) == 40 - done.request_counts.completed  # type: ignore[union-attr]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        await oai.batches.cancel(batch.id)


async def test_batch_expired_keeps_partial_results(oai: AsyncOpenAI, stack: Stack) -> None:
    lines = [_line(f"e{i}", _chat(STORY[0]["content"], max_tokens=300)) for i in range(30)]
    batch = await oai.batches.create(
        input_file_id=await _upload(oai, lines), endpoint=CHAT, completion_window="24h"
    )
    await _wait_batch(oai, batch.id, {"in_progress"})
    # Move the batch's deadline instead of the clock.
    engine = create_async_engine(stack.servers.database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": batch.id},
        )
    await engine.dispose()
    done = await _wait_batch(oai, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at is not None
    errors = await _lines(oai, done.error_file_id)
    assert errors and {e["error"]["code"] for e in errors} == {"batch_expired"}
    completed = done.request_counts.completed  # type: ignore[union-attr]
    if completed:
        assert len(await _lines(oai, done.output_file_id)) == completed
    assert completed + len(errors) == 30


async def test_interactive_job_starts_within_a_second_while_a_batch_runs(
    oai: AsyncOpenAI, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        _line(f"b{i}", _chat(f"Tell me a fact about the number {i}.", max_tokens=48)) for i in range(200)
    ]
    batch = await oai.batches.create(
        input_file_id=await _upload(oai, lines), endpoint=CHAT, completion_window="24h"
    )
    try:
        await _wait_batch(oai, batch.id, {"in_progress"})
        await asyncio.sleep(3)  # the worker is busy with batch jobs
        running = (await client.get("/v1/jobs", params={"status": "running", "limit": 100})).json()["data"]
        assert len(running) >= 4, "the batch should be running"
        waits = []
        for _ in range(3):
            job = await submit(client, messages=FRANCE, max_tokens=4, temperature=0)
            started = await wait_status(client, job["id"], "running", timeout=10)
            if started["status"] == "running":
                created = datetime.fromisoformat(started["created_at"])
                began = datetime.fromisoformat(started["started_at"])
                waits.append((began - created).total_seconds())
            await asyncio.sleep(0.5)
        with capsys.disabled():
            shown = ", ".join(f"{w * 1000:.0f} ms" for w in waits)
            print(f"\ninteractive queue wait during a 200-line batch: {shown}")
        assert waits and max(waits) < 1.0, waits
        counts = (await oai.batches.retrieve(batch.id)).request_counts
        assert counts is not None and counts.completed + counts.failed < 200, (
            "the batch must still be running"
        )
    finally:
        await oai.batches.cancel(batch.id)
        await _wait_batch(oai, batch.id, timeout=60)


async def test_files_refuse_bad_uploads(oai: AsyncOpenAI, client: httpx.AsyncClient) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await oai.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await oai.files.create(file=("x.jsonl", io.BytesIO(b"\n\n")), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        await oai.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    assert err.value.body["param"] == "input_file_id"  # type: ignore[index]
    resp = await client.post(
        "/v1/batches",
        json={"input_file_id": "x", "endpoint": "/v1/images/generations", "completion_window": "24h"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        await oai.files.retrieve("file-nope")
    file_id = await _upload(oai, [_line("only", _chat("hi"))])
    assert (await oai.files.retrieve(file_id)).filename == "input.jsonl"
    assert (await oai.files.content(file_id)).text == _jsonl([_line("only", _chat("hi"))]).decode()
    assert (await oai.files.delete(file_id)).deleted
