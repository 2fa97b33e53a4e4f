"""logprobs on chat completions, legacy completions and the job API, in OpenAI's shapes, parsed with the
official SDK's own types: one entry per output token, its alternatives sorted, and at temperature 0
the chosen token is the best one."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionTokenLogprob

from tests.conftest import Stack
from tests.helpers import FRANCE, read_sse, submit, wait_job

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _check_chat_entries(entries: list[ChatCompletionTokenLogprob], text: str, k: int, greedy: bool) -> None:
    assert entries
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == text
    for e in entries:
        assert e.logprob <= 0 and math.isfinite(e.logprob)
        assert e.token == bytes(e.bytes or []).decode(errors="replace")
        assert len(e.top_logprobs) == k
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        if greedy:
            assert e.top_logprobs[0].token == e.token
            assert e.top_logprobs[0].logprob == e.logprob
        elif k:
            assert e.logprob <= values[0]


async def test_logprobs_chat_at_temperature_zero_name_the_best_token_first(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=FRANCE, max_tokens=16, temperature=0, logprobs=True, top_logprobs=5
    )  # type: ignore[call-overload]
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    _check_chat_entries(entries, choice.message.content or "", 5, greedy=True)
    assert completion.usage is not None
    eos = 1 if choice.finish_reason == "stop" else 0  # the end-of-sequence token is not listed
    assert len(entries) == completion.usage.completion_tokens - eos
    job = await wait_job(client, raw.headers["x-inferq-job-id"])
    assert [e["token"] for e in job["logprobs"]] == [e.token for e in entries]

    plain = await oai.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: not given


async def test_logprobs_chat_streamed_chunks_carry_each_tokens_logprobs(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about dragons."}],
        max_tokens=24,
        temperature=1.0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    text, entries = "", []
    async for chunk in raw.parse():
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs is not None and choice.logprobs.content:
            entries += choice.logprobs.content
    _check_chat_entries(entries, text, 3, greedy=False)
    job = await wait_job(client, raw.headers["x-inferq-job-id"])
    assert job["output"] == text
    assert [ChatCompletionTokenLogprob.model_validate(e) for e in job["logprobs"]] == entries


async def test_logprobs_completions_in_the_legacy_shape_streamed_and_not(oai: AsyncOpenAI) -> None:
    prompt = "The capital of France is"
    completion = await oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2
    )
    choice = completion.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2
        assert max(top.values()) == logprob and top[token] == logprob  # greedy: the best token

    stream = await oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2, stream=True
    )
    tokens: list[str] = []
    offsets: list[int] = []
    async for chunk in stream:
        chunk_lp = chunk.choices[0].logprobs if chunk.choices else None
        if chunk_lp is not None and chunk_lp.tokens:
            tokens += chunk_lp.tokens
            offsets += chunk_lp.text_offset or []
    assert tokens == lp.tokens  # greedy: the same tokens
    assert offsets == lp.text_offset


async def test_logprobs_job_api_token_events_and_the_finished_job(client: httpx.AsyncClient) -> None:
    job = await submit(
        client, messages=FRANCE, max_tokens=12, temperature=0.7, seed=5, logprobs=True, top_logprobs=2
    )
    events = await read_sse(client, job["id"])
    tokens = [e for e in events if e.event == "token"]
    streamed: list[dict[str, Any]] = [entry for e in tokens for entry in e.data["logprobs"]]
    finished = await wait_job(client, job["id"])
    assert finished["logprobs"] == streamed
    assert "".join(e["token"] for e in streamed) == finished["output"]
    assert all(len(e["top_logprobs"]) == 2 for e in streamed)

    plain = await submit(client, prompt="Hello", max_tokens=3, temperature=0)
    plain_events = await read_sse(client, plain["id"])
    assert all("logprobs" not in e.data for e in plain_events if e.event == "token")
    assert (await wait_job(client, plain["id"]))["logprobs"] is None


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": FRANCE, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": FRANCE, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": FRANCE, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 1, "echo": True}, "logprobs"),
        ("/v1/jobs", {"prompt": "Hi", "top_logprobs": 1}, "top_logprobs"),
        ("/v1/jobs", {"prompt": "Hi", "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/responses", {"input": "Hi", "top_logprobs": 3}, "top_logprobs"),
    ],
)
async def test_logprobs_bad_inputs_are_a_400_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    resp = await client.post(path, json={"model": MODEL, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_logprobs_sdk_raises_bad_request_for_top_logprobs_alone(oai: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model=MODEL, messages=FRANCE, top_logprobs=3)  # type: ignore[arg-type]
    assert info.value.body["param"] == "top_logprobs"  # type: ignore[index]
