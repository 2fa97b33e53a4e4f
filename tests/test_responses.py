"""OpenAI's Responses API through the official `openai` SDK, unchanged: background mode as a durable job,
streams resumed by sequence_number on any API process, cancel, delete, conversations, and the 400s.
Every Response and every stream event is checked against the SDK's own pydantic models, strictly."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from shared import keys
from tests.conftest import Stack, start_api
from tests.helpers import wait_job

MODEL = "SmolLM2-135M-Instruct"
FRANCE = "What is the capital of France?"
HELPFUL = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
STORY = "Write a very long, detailed story about a dragon who learns to cook."
EVENT = TypeAdapter(ResponseStreamEvent)


def _oai(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
async def oai(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    client = _oai(stack.base_url)
    yield client
    await client.close()


def strict(response: Response) -> Response:
    """The Response as the SDK's model validates it in strict mode (the SDK itself only constructs)."""
    return Response.model_validate(response.to_dict(), strict=True)


def strict_event(event: Any) -> Any:
    parsed = EVENT.validate_python(event.to_dict(), strict=True)
    assert type(parsed) is type(event), (type(parsed), type(event))
    return parsed


async def collect(stream: Any, limit: int | None = None) -> list[Any]:
    events = []
    async for event in stream:
        events.append(strict_event(event))
        if limit is not None and len(events) >= limit:
            break
    await stream.close()
    return events


def deltas(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def check_numbers(events: list[Any]) -> None:
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)), numbers


async def wait_response(oai: AsyncOpenAI, response_id: str, timeout: float = 120) -> Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await oai.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return strict(response)
        await asyncio.sleep(0.2)
    raise AssertionError(f"response {response_id} did not finish in {timeout}s")


async def test_responses_background_create_poll_completes_with_paris_as_a_job(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    created = strict(
        await oai.responses.create(
            model=MODEL,
            input=FRANCE,
            background=True,
            temperature=0,
            max_output_tokens=24,
            metadata={"case": "paris"},
        )
    )
    assert created.status == "queued" and created.background is True and created.output == []
    assert created.id.startswith("resp_")

    done = await wait_response(oai, created.id)
    assert done.status == "completed", done
    assert "Paris" in done.output_text
    assert done.output[0].type == "message" and done.output[0].status == "completed"
    assert done.usage is not None and done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.metadata == {"case": "paris"} and done.max_output_tokens == 24 and done.temperature == 0

    # The same job as any other: listed, with the response's input kept beside the request.
    job_id = "job_" + created.id.removeprefix("resp_")
    job = await wait_job(client, job_id)
    assert job["status"] == "succeeded" and job["output"] == done.output_text
    assert job["request"]["endpoint"] == "/v1/responses"
    listed = (await client.get("/v1/jobs", params={"limit": 100})).json()["data"]
    assert job_id in {j["id"] for j in listed}

    items = ResponseItemList.model_validate(
        (await oai.responses.input_items.list(created.id)).to_dict(), strict=True
    )
    assert [i.role for i in items.data] == ["user"]  # type: ignore[union-attr]
    assert items.data[0].content[0].text == FRANCE  # type: ignore[union-attr]


async def test_responses_foreground_answers_and_streams_like_the_chat_routes(oai: AsyncOpenAI) -> None:
    answer = strict(
        await oai.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": FRANCE}],
            instructions=HELPFUL,
            temperature=0,
            max_output_tokens=80,
        )
    )
    assert answer.status == "completed" and "Paris" in answer.output_text, answer.output_text
    assert answer.instructions == HELPFUL and answer.background is False

    events = await collect(
        await oai.responses.create(
            model=MODEL, input=FRANCE, temperature=0, max_output_tokens=24, stream=True
        )
    )
    check_numbers(events)
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "response.queued" not in types  # only background responses queue visibly
    final = events[-1].response
    assert deltas(events) == final.output_text == events[-4].text
    assert events[0].response.status == "in_progress" and final.status == "completed"


async def test_responses_incomplete_at_max_output_tokens(oai: AsyncOpenAI) -> None:
    response = strict(
        await oai.responses.create(model=MODEL, input=STORY, max_output_tokens=5, temperature=0)
    )
    assert response.status == "incomplete"
    assert (
        response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    )
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]


async def test_responses_background_stream_resumes_on_other_api_processes_and_from_postgres(
    stack: Stack, oai: AsyncOpenAI
) -> None:
    k = 8
    stream = await oai.responses.create(
        model=MODEL, input=STORY, background=True, stream=True, temperature=0, max_output_tokens=60
    )
    head = await collect(stream, limit=k)  # then the connection drops
    assert [e.type for e in head[:2]] == ["response.created", "response.queued"]
    response_id = head[0].response.id
    last_seen = head[-1].sequence_number

    url, second = start_api(stack)
    try:
        async with _oai(url) as other:
            tail = await collect(
                await other.responses.retrieve(response_id, stream=True, starting_after=last_seen)
            )
    finally:
        second.stop()
    assert tail[0].sequence_number > last_seen
    events = head + tail
    check_numbers(events)
    final = tail[-1]
    assert final.type == "response.incomplete" and final.response.status == "incomplete"  # a long story, cut
    assert deltas(events) == final.response.output_text and final.response.output_text

    # Both API processes that served it are gone; two new ones give the same events after any point.
    replays = []
    for _ in range(2):
        url, api = start_api(stack)
        try:
            async with _oai(url) as fresh:
                replays.append(
                    await collect(
                        await fresh.responses.retrieve(response_id, stream=True, starting_after=last_seen)
                    )
                )
        finally:
            api.stop()
    for replay in replays:
        assert [e.to_dict() for e in replay] == [e.to_dict() for e in tail]

    # The job's Redis events expired: rebuilt from Postgres, with the same numbering and text, from
    # any point (a resume between two deltas' numbers gets the text from that character on).
    points = sorted({0, 3, 5, last_seen, last_seen + 1, (last_seen + tail[-1].sequence_number) // 2})
    points += [tail[-1].sequence_number - n for n in (5, 4, 1)]
    live = {
        n: await collect(await oai.responses.retrieve(response_id, stream=True, starting_after=n))
        for n in points
    }
    r = aioredis.from_url(stack.servers.redis_url)
    await r.delete(keys.events_stream("job_" + response_id.removeprefix("resp_")))
    await r.aclose()
    for n in points:
        again = await collect(await oai.responses.retrieve(response_id, stream=True, starting_after=n))
        assert deltas(again) == deltas(live[n]), n
        others = [
            [e.to_dict() for e in x if e.type != "response.output_text.delta"] for x in (again, live[n])
        ]
        assert others[0] == others[1], n
        assert all(e.sequence_number > n for e in again)
    rebuilt = await collect(await oai.responses.retrieve(response_id, stream=True, starting_after=last_seen))
    check_numbers(head + rebuilt)
    assert rebuilt[0].sequence_number > last_seen
    assert deltas(head + rebuilt) == final.response.output_text
    assert rebuilt[-4:] and [e.to_dict() for e in rebuilt[-4:]] == [e.to_dict() for e in tail[-4:]]
    whole = await collect(await oai.responses.retrieve(response_id, stream=True))
    assert whole[0].type == "response.created" and deltas(whole) == final.response.output_text


async def test_responses_cancel_in_progress_stops_within_a_second_keeping_partial_text(
    oai: AsyncOpenAI,
) -> None:
    stream = await oai.responses.create(
        model=MODEL, input=STORY, background=True, stream=True, max_output_tokens=400
    )
    head = []
    async for event in stream:
        head.append(event)
        if len(deltas(head)) > 20:
            break
    await stream.close()
    response_id = head[0].response.id

    t0 = time.monotonic()
    cancelled = strict(await oai.responses.cancel(response_id))
    elapsed = time.monotonic() - t0
    assert cancelled.status == "cancelled", cancelled
    assert elapsed < 1.0, elapsed
    assert cancelled.output_text.startswith(deltas(head)) and len(cancelled.output_text) >= len(deltas(head))
    assert cancelled.usage is not None and 0 < cancelled.usage.output_tokens < 400

    # Its stream ends, and cancelling again returns it unchanged.
    events = await collect(await oai.responses.retrieve(response_id, stream=True))
    check_numbers(events)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert deltas(events) == cancelled.output_text
    again = strict(await oai.responses.cancel(response_id))
    assert again.to_dict() == cancelled.to_dict()


async def test_responses_previous_response_id_continues_the_conversation(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    first = strict(
        await oai.responses.create(
            model=MODEL,
            input="My name is Ada.",
            instructions=HELPFUL,
            temperature=0,
            max_output_tokens=16,
        )
    )
    second = strict(
        await oai.responses.create(
            model=MODEL,
            input="What is my name?",
            previous_response_id=first.id,
            temperature=0,
            max_output_tokens=16,
        )
    )
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id
    job = await wait_job(client, "job_" + second.id.removeprefix("resp_"))
    # The earlier input and answer, not its instructions (they do not carry over), then the new input.
    assert job["request"]["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    items = await oai.responses.input_items.list(second.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["What is my name?"]  # type: ignore[union-attr]


async def test_responses_delete_then_get_is_404(oai: AsyncOpenAI, stack: Stack) -> None:
    response = await oai.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=8)
    assert await oai.responses.delete(response.id) is None
    calls = (
        lambda: oai.responses.retrieve(response.id),
        lambda: oai.responses.cancel(response.id),
        lambda: oai.responses.input_items.list(response.id),
        lambda: oai.responses.create(model=MODEL, input="Again?", previous_response_id=response.id),
        lambda: oai.responses.delete(response.id),
    )
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            await call()
    r = aioredis.from_url(stack.servers.redis_url)
    assert not await r.exists(keys.events_stream("job_" + response.id.removeprefix("resp_")))
    await r.aclose()


async def test_responses_worker_lost_mid_response_streams_one_consistent_text(
    oai: AsyncOpenAI, stack: Stack
) -> None:
    stream = await oai.responses.create(
        model=MODEL, input=STORY, background=True, stream=True, temperature=1.0, max_output_tokens=48
    )
    events = []
    async for event in stream:
        events.append(strict_event(event))
        if len(deltas(events)) > 10:
            break
    await stream.close()
    response_id = events[0].response.id
    await asyncio.to_thread(stack.restart_worker, signal.SIGKILL)

    rest = await collect(
        await oai.responses.retrieve(response_id, stream=True, starting_after=events[-1].sequence_number)
    )
    events += rest
    check_numbers(events)
    final = await wait_response(oai, response_id)
    assert final.status in ("completed", "incomplete")
    # Sampled, yet one text: the retried attempt continued the one the lost worker had published.
    assert deltas(events) == final.output_text
    assert [e.type for e in events].count("response.in_progress") == 1


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "not supported"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "not supported"),
        ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", "'json_schema'"),
        ({"background": True, "store": False}, "store", "must be stored"),
        ({"frobnicate": 1}, "frobnicate", "unknown field"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0.type",
            "input_image",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input",
            "answers no earlier call",
        ),
        ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input.0.type", "computer_call"),
        ({"input": []}, "input", "empty"),
        ({"previous_response_id": "resp_0123456789abcdef01234567"}, "previous_response_id", "no response"),
        ({"model": "no-such-model"}, "model", "not served"),
    ],
)
async def test_responses_refuses_what_it_cannot_honour_naming_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": MODEL, "input": FRANCE, **extra}
    resp = await client.post("/v1/responses", json=body)
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error


async def test_responses_unknown_ids_and_bad_resume_points(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    for bad in ("resp_0123456789abcdef01234567", "job_x", "resp_../../etc"):
        assert (await client.get(f"/v1/responses/{bad}")).status_code == 404
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )
    not_a_response = "resp_" + chat.headers["x-inferq-job-id"].removeprefix("job_")
    assert (await client.get(f"/v1/responses/{not_a_response}")).status_code == 404

    done = await oai.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=8)
    events = await collect(await oai.responses.retrieve(done.id, stream=True))
    last = events[-1].sequence_number
    assert await collect(await oai.responses.retrieve(done.id, stream=True, starting_after=last)) == []
    for n in (last + 1, -1):
        resp = await client.get(f"/v1/responses/{done.id}", params={"stream": "true", "starting_after": n})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "starting_after"


async def test_responses_queued_cancel_never_runs_and_foreground_leaver_cancels(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    # Fill the engine, so that a new response has to wait its turn.
    fillers = [
        (await client.post("/v1/jobs", json={"prompt": STORY, "max_tokens": 300})).json()["id"]
        for _ in range(24)
    ]
    try:
        queued = strict(await oai.responses.create(model=MODEL, input=FRANCE, background=True))
        cancelled = strict(await oai.responses.cancel(queued.id))
        job = await wait_job(client, "job_" + queued.id.removeprefix("resp_"))
        assert cancelled.status == "cancelled" and cancelled.output == []
        assert job["attempts"] == 0 and job["started_at"] is None  # it never ran
        events = await collect(await oai.responses.retrieve(queued.id, stream=True))
        assert [e.type for e in events] == ["response.created", "response.queued", "response.incomplete"]
    finally:
        for job_id in fillers:
            await client.post(f"/v1/jobs/{job_id}/cancel")

    # A foreground stream whose client leaves: its job is cancelled, as on the chat routes.
    stream = await oai.responses.create(model=MODEL, input=STORY, stream=True, max_output_tokens=300)
    head = await collect(stream, limit=8)
    job_id = "job_" + head[0].response.id.removeprefix("resp_")
    left = await wait_job(client, job_id)
    assert left["status"] == "cancelled" and left["usage"]["completion_tokens"] < 300


async def test_responses_stream_survives_keepalive_pings_in_the_sdk(stack: Stack) -> None:
    # The SDK's SSE decoder turns a ping comment followed by a blank line into an empty event once an
    # earlier event had an id, and fails on it (openai-python #2722): pings must be bare comment lines.
    url, api = start_api(stack, INFERQ_EVENTS__PING_SECONDS="1")
    client = _oai(url)
    try:
        stream = await client.responses.create(
            model=MODEL, input=STORY, stream=True, max_output_tokens=120, temperature=0
        )
        t0 = time.monotonic()
        events = await collect(stream)
        assert time.monotonic() - t0 > 2.5  # it streamed through two pings at least
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert deltas(events) == events[-1].response.output_text
        async with httpx.AsyncClient(base_url=url, timeout=30) as raw:
            body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "max_tokens": 120}
            job = (await raw.post("/v1/jobs", json=body)).json()
            got = b""
            async with raw.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
                async for chunk in resp.aiter_bytes():
                    got += chunk
        assert b": ping\r\n" in got and b": ping\r\n\r\n" not in got, got[-400:]
    finally:
        await client.close()
        api.stop()
