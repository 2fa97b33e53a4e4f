"""n > 1: one job runs n engine requests for one prompt; the answer has n choices, usage counts the
prompt once, streamed chunks carry their choice's index, and the job keeps every output."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from tests.conftest import Stack
from tests.helpers import FRANCE, STORY, read_sse, submit, wait_job

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


async def test_choices_chat_n3_gives_three_choices_and_one_prompts_usage(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=STORY, max_tokens=16, temperature=1.0, n=3, seed=11
    )  # type: ignore[call-overload]
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content or "" for c in completion.choices]
    assert all(texts) and len(set(texts)) > 1  # sampled: not three copies
    single = await oai.chat.completions.create(model=MODEL, messages=STORY, max_tokens=4, temperature=0)
    assert completion.usage is not None and single.usage is not None
    assert completion.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt once
    assert completion.usage.completion_tokens > 16  # every choice's tokens

    job = await wait_job(client, raw.headers["x-inferq-job-id"])
    assert [c["text"] for c in job["choices"]] == texts
    assert job["output"] == texts[0]
    assert job["usage"]["completion_tokens"] == completion.usage.completion_tokens

    again = await oai.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=16, temperature=1.0, n=3, seed=11
    )
    assert [c.message.content for c in again.choices] == texts  # a seed reproduces all n


async def test_choices_streamed_chunks_carry_their_index(oai: AsyncOpenAI, client: httpx.AsyncClient) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=12,
        temperature=0.8,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finished: dict[int, str] = {}
    usages = []
    async for chunk in raw.parse():
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1}
    assert len(usages) == 1
    job = await wait_job(client, raw.headers["x-inferq-job-id"])
    assert [c["text"] for c in job["choices"]] == [texts[0], texts[1]]
    assert [c["finish_reason"] for c in job["choices"]] == [finished[0], finished[1]]
    assert usages[0].prompt_tokens == job["usage"]["prompt_tokens"]


async def test_choices_long_prompt_outputs_share_it_and_stay_greedy(oai: AsyncOpenAI) -> None:
    """A prompt longer than a cache page: the later outputs start once the first has it in the cache
    (prefix sharing); greedy, every choice is the single answer."""
    context = " ".join(f"Fact {i}: the sky is blue." for i in range(40))
    messages = [{"role": "user", "content": context + " What colour is the sky?"}]
    many = await oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, n=3
    )  # type: ignore[arg-type]
    one = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert many.usage is not None and many.usage.prompt_tokens > 256
    assert [c.message.content for c in many.choices] == [one.choices[0].message.content] * 3


async def test_choices_completions_with_logprobs(oai: AsyncOpenAI) -> None:
    completion = await oai.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, n=2, logprobs=1
    )
    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.logprobs is not None and choice.logprobs.tokens
        assert "".join(choice.logprobs.tokens) == choice.text


async def test_choices_job_events_name_their_output(client: httpx.AsyncClient) -> None:
    job = await submit(client, prompt="Hello, my name is", max_tokens=6, temperature=1.0, n=2)
    events = await read_sse(client, job["id"])
    tokens = [e for e in events if e.event == "token"]
    assert {e.data["choice"] for e in tokens} == {0, 1}
    assert [e.data["index"] for e in tokens] == list(range(len(tokens)))
    done = events[-1]
    assert done.event == "done" and [c["index"] for c in done.data["choices"]] == [0, 1]
    finished = await wait_job(client, job["id"])
    for i in (0, 1):
        assert (
            "".join(e.data["text"] for e in tokens if e.data["choice"] == i) == finished["choices"][i]["text"]
        )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": FRANCE, "n": 9}),
        ("/v1/completions", {"prompt": "Hi", "n": 9}),
        ("/v1/jobs", {"prompt": "Hi", "n": 9}),
        ("/v1/jobs", {"prompt": "Hi", "n": 0}),
    ],
)
async def test_choices_n_over_the_limit_is_a_400_naming_n(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    resp = await client.post(path, json={"model": MODEL, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "n"
