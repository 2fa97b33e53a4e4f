"""Small client helpers shared by the tests."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from shared.events import CHOICE, RESUME_FROM, RESUME_FROM_BY_CHOICE

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long, detailed story about a dragon who learns to cook."}]
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


@dataclass
class SseEvent:
    id: int
    event: str
    data: dict[str, Any]


async def submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in TERMINAL:
            return job
        await asyncio.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


async def wait_status(
    client: httpx.AsyncClient, job_id: str, status: str, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] == status:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never became {status}")


async def iter_sse(
    client: httpx.AsyncClient,
    job_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """Yield SseEvents of a job's stream until it ends."""
    async with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params, timeout=httpx.Timeout(60.0)
    ) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in resp.aiter_lines():
            if line == "":
                if "data" in fields and "event" in fields:
                    yield SseEvent(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


async def read_sse(client: httpx.AsyncClient, job_id: str, **kw: Any) -> list[SseEvent]:
    return [e async for e in iter_sse(client, job_id, **kw)]


def tokens_text(events: list[SseEvent]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "token")


def choice_texts(events: list[SseEvent], n: int = 1) -> list[str]:
    """Each output's text as a client following the job's stream has it: its token events in order; an
    attempt that starts (a `running` status) keeps the characters it says it continues from."""
    texts = [""] * n
    for e in events:
        if e.event == "token":
            texts[int(e.data.get(CHOICE) or 0)] += e.data["text"]
        elif e.event == "status" and e.data.get("status") == "running":
            keep = e.data.get(RESUME_FROM_BY_CHOICE) or [e.data.get(RESUME_FROM) or 0] * n
            texts = [t[: int(keep[i] or 0)] for i, t in enumerate(texts)]
    return texts
