"""Deadlines: `Cancel-After` (header or field) ends a job that has not started by then as `expired`,
without running it, and stops a running one with its output so far; `timeout_seconds` bounds the
running time alone. Both are kept in Postgres, so a worker restart does not reset them."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from shared.deadlines import EXPIRED_TYPE, parse_duration
from tests.conftest import Stack
from tests.helpers import STORY, read_sse, submit, tokens_text, wait_job, wait_status

# Greedy counting goes on for thousands of tokens: a job that ends before max_tokens ended on its deadline.
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "max_tokens": 4000}


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_parse_duration_reads_go_durations_and_seconds() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2.5s") == 2.5
    assert parse_duration(" 12 ") == 12
    for bad in ("", "0", "-1s", "5x", "1m 30s", "s", "nan", "inf", "1h-5m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("headers", "body", "param"),
    [
        ({"Cancel-After": "soon"}, {}, "Cancel-After"),
        ({"Cancel-After": "0s"}, {}, "Cancel-After"),
        ({}, {"cancel_after": "5 minutes"}, "cancel_after"),
        ({}, {"cancel_after": -1}, "cancel_after"),
        ({}, {"cancel_after": 8 * 86_400}, "cancel_after"),
        ({"Cancel-After": "200h"}, {}, "Cancel-After"),
        ({}, {"timeout_seconds": 0}, "timeout_seconds"),
        ({}, {"timeout_seconds": 7200}, "timeout_seconds"),
    ],
)
async def test_deadlines_bad_values_are_400s_naming_them(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, object], param: str
) -> None:
    resp = await client.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4, **body}, headers=headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


async def test_deadlines_show_on_the_job(client: httpx.AsyncClient) -> None:
    before = time.time()
    job = await submit(client, prompt="Hi", max_tokens=4, cancel_after="1m", timeout_seconds=30)
    view = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert before + 59 < _ts(view["cancel_at"]) < time.time() + 61
    assert view["timeout_seconds"] == 30
    done = await wait_job(client, job["id"])
    # Once it started, the running-time bound joined the deadline: the earlier of the two applies.
    assert _ts(done["deadline_at"]) == pytest.approx(_ts(done["started_at"]) + 30, abs=0.01)
    assert "cancel_after" not in done["request"] and "timeout_seconds" not in done["request"]
    untimed = await submit(client, prompt="Hi", max_tokens=4)
    assert (await client.get(f"/v1/jobs/{untimed['id']}")).json()["timeout_seconds"] == 600  # the default
    await wait_job(client, untimed["id"])


async def _fill(client: httpx.AsyncClient, n: int = 24) -> list[str]:
    """Jobs enough to fill the engine's 16 slots, so that the next job waits its turn."""
    return [(await submit(client, messages=STORY, max_tokens=300))["id"] for _ in range(n)]


async def _cancel(client: httpx.AsyncClient, job_ids: list[str]) -> None:
    for job_id in job_ids:
        await client.post(f"/v1/jobs/{job_id}/cancel")


async def test_cancel_after_behind_a_full_engine_expires_without_running(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    fillers = await _fill(client)
    try:
        t0 = time.monotonic()
        job = await submit(client, prompt="What is 2+2?", max_tokens=8, cancel_after="1s")
        oai = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
        response = await oai.responses.create(
            model="SmolLM2-135M-Instruct",
            input="What is 2+2?",
            background=True,
            extra_headers={"Cancel-After": "1s"},
        )
        done = await wait_job(client, job["id"], timeout=30)
        waited = time.monotonic() - t0
        assert done["status"] == "expired" and done["finish_reason"] == "timeout", done
        assert done["attempts"] == 0 and done["started_at"] is None and done["output"] == ""
        assert done["error"]["type"] == EXPIRED_TYPE
        assert waited < 4, waited  # ended within a few reaper ticks of its deadline
        events = await read_sse(client, job["id"])
        assert events[-1].event == "done"
        assert events[-1].data["finish_reason"] == "timeout" and events[-1].data["status"] == "expired"
        assert not [e for e in events if e.event == "token"]
        # The same job behind the Responses API: cancelled, and it never produced output.
        resp_job = await wait_job(client, "job_" + response.id.removeprefix("resp_"), timeout=30)
        assert resp_job["status"] == "expired"
        assert (await oai.responses.retrieve(response.id)).status == "cancelled"
        await oai.close()
    finally:
        await _cancel(client, fillers)


async def test_running_job_stops_at_its_deadline_with_partial_output(client: httpx.AsyncClient) -> None:
    timed = await submit(client, **COUNTING, timeout_seconds=4)
    deadline = await submit(client, **COUNTING, cancel_after=8)  # from submission: queue time counts
    for job, bound in ((timed, 4.0), (deadline, 8.0)):
        done = await wait_job(client, job["id"], timeout=60)
        assert done["status"] == "cancelled" and done["finish_reason"] == "timeout", done
        events = await read_sse(client, job["id"])
        text = tokens_text(events)
        assert text and done["output"] == text  # what it generated before its deadline is kept
        assert 0 < done["usage"]["completion_tokens"] < COUNTING["max_tokens"]
        assert events[-1].event == "done" and events[-1].data["finish_reason"] == "timeout"
        start = done["started_at"] if job is timed else done["created_at"]
        overrun = _ts(done["finished_at"]) - _ts(start) - bound
        assert -0.05 < overrun < 1.0, overrun  # stopped within a second of its deadline


async def test_chat_route_with_a_deadline_says_it_timed_out(stack: Stack) -> None:
    oai = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    try:
        with pytest.raises(openai.ConflictError, match="reached its deadline"):
            await oai.completions.create(
                model="SmolLM2-135M-Instruct",
                prompt=str(COUNTING["prompt"]),
                max_tokens=4000,
                temperature=0,
                extra_headers={"Cancel-After": "2s"},
            )
    finally:
        await oai.close()


async def test_deadline_survives_a_worker_restart(client: httpx.AsyncClient, stack: Stack) -> None:
    # A running job handed back by its worker keeps the deadline it got when it first started.
    job = await submit(client, **COUNTING, timeout_seconds=40)
    first = await wait_status(client, job["id"], "running")
    await asyncio.sleep(1)
    await asyncio.to_thread(stack.restart_worker)  # SIGTERM: the job goes back to the queue
    done = await wait_job(client, job["id"], timeout=90)
    assert done["status"] == "cancelled" and done["finish_reason"] == "timeout", done
    assert done["attempts"] == 2  # it ran again on the new worker, and stopped at the first deadline
    overrun = _ts(done["finished_at"]) - _ts(first["started_at"]) - 40
    assert -0.05 < overrun < 1.5, overrun
    assert done["output"] == tokens_text(await read_sse(client, job["id"]))

    # With no worker at all, a deadline still ends the job: the API enforces it while the job waits.
    stack.worker.stop()
    stack.wait_workers(0)
    try:
        waiting = await submit(client, prompt="Hi", max_tokens=4, cancel_after="1s")
        done = await wait_job(client, waiting["id"], timeout=30)
        assert done["status"] == "expired" and done["attempts"] == 0
    finally:
        stack.worker.start()
        stack.wait_workers(1)
