"""The official `openai` SDK against the running stack: every request is an inferq job."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from tests.conftest import Stack, start_api
from tests.helpers import FRANCE, STORY, wait_job

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_openai_chat_non_stream_answers_and_records_a_job(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=20,
        temperature=0,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    job_id = raw.headers["x-inferq-job-id"]
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )

    job = await wait_job(client, job_id)
    assert job["status"] == "succeeded"
    assert job["output"] == completion.choices[0].message.content
    assert job["request"]["endpoint"] == "/v1/chat/completions"
    listed = (await client.get("/v1/jobs", params={"limit": 100})).json()["data"]
    assert job_id in {j["id"] for j in listed}


async def test_openai_chat_stream_deltas_equal_stored_output(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=STORY,  # type: ignore[arg-type]
        max_tokens=40,
        temperature=0.8,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    job_id = raw.headers["x-inferq-job-id"]
    stream = raw.parse()
    text, finish, usage, roles = "", None, None, []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"]
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 40
    job = await wait_job(client, job_id)
    assert text and text == job["output"]
    assert job["usage"]["completion_tokens"] == usage.completion_tokens


async def test_openai_completions_stream_and_non_stream(oai: AsyncOpenAI) -> None:
    done = await oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert done.object == "text_completion"
    assert done.choices[0].text
    assert done.usage is not None and done.usage.completion_tokens <= 8

    stream = await oai.completions.create(
        model=MODEL, prompt=["The capital of France is"], max_tokens=8, temperature=0, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == done.choices[0].text  # greedy: the same tokens either way


async def test_openai_completions_default_to_sixteen_tokens(oai: AsyncOpenAI) -> None:
    done = await oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, stop=None)
    assert done.usage is not None
    assert done.usage.completion_tokens <= 16


async def test_openai_models_lists_the_served_model(oai: AsyncOpenAI) -> None:
    models = await oai.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]
    assert (await oai.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("no-such-model")


async def test_openai_models_lists_configured_models_before_any_worker_serves_them(stack: Stack) -> None:
    # An API that also counts tokens for "spare": a client that waited for /readyz finds it listed at once,
    # with no worker yet, rather than an empty list.
    url, api = start_api(
        stack, INFERQ_EXTRA_MODELS=json.dumps({"spare": stack.api.env["INFERQ_MODEL__NAME"]})
    )
    try:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        models = {m.id: m for m in (await client.models.list()).data}
        assert set(models) == {MODEL, "spare"}
        assert (models["spare"].model_extra or {})["workers"] == 0
        assert (models[MODEL].model_extra or {})["workers"] >= 1
        await client.close()
    finally:
        api.stop()


async def test_openai_rejects_unsupported_parameters_clearly(oai: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(model=MODEL, messages=FRANCE, n=9)  # type: ignore[arg-type]
    assert err.value.body["param"] == "n"  # type: ignore[index]
    assert "n must be at most 8" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        )
    assert "only text content parts" in err.value.body["message"]  # type: ignore[index]


async def test_openai_ignores_unknown_parameters(oai: AsyncOpenAI) -> None:
    done = await oai.chat.completions.create(
        model=MODEL,
        messages=FRANCE,  # type: ignore[arg-type]
        max_completion_tokens=5,
        temperature=0,
        user="someone",
        extra_body={"frobnicate": True, "presence_penalty": 0.5},
    )
    assert done.usage is not None and done.usage.completion_tokens <= 5


async def test_openai_stream_disconnect_cancels_the_job(stack: Stack, client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 2000, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        job_id = resp.headers["x-inferq-job-id"]
        seen = 0
        async for line in resp.aiter_lines():
            if line.startswith("data:") and '"content"' in line:
                seen += 1
                if seen >= 3:
                    break  # leave mid-stream
    job = await wait_job(client, job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert 0 < job["usage"]["completion_tokens"] < 2000


async def test_openai_non_stream_disconnect_cancels_the_job(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 2000}
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
    await asyncio.sleep(0.5)
    jobs = (await client.get("/v1/jobs", params={"limit": 1})).json()["data"]
    job = await wait_job(client, jobs[0]["id"], timeout=30)
    assert job["request"]["max_tokens"] == 2000
    assert job["status"] == "cancelled"
