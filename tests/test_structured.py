"""Structured outputs (`response_format`) on the real stack: the demo model's output follows the schema
because the worker masks its logits with a grammar, whatever the sampling."""

from __future__ import annotations

import asyncio
import io
import json
import time
from enum import StrEnum
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from shared.structured import SCHEMA_INVALID, SCHEMA_TOO_LARGE, SCHEMA_UNSUPPORTED
from tests.conftest import Stack
from tests.helpers import FRANCE, submit, wait_job

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
CITY = [{"role": "user", "content": "Describe the city of Paris as JSON."}]


class Size(StrEnum):
    small = "small"
    medium = "medium"
    large = "large"


class Landmark(BaseModel):
    name: str = Field(max_length=16)
    year: int | None = Field(ge=0, le=2100)


class Country(BaseModel):
    name: str = Field(max_length=16)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


class City(BaseModel):
    """Nested objects, an enum, a list and optional fields; strings and the list are bounded, so that a
    sampled answer closes within max_tokens."""

    name: str = Field(max_length=16)
    size: Size
    country: Country
    landmarks: list[Landmark] = Field(max_length=2)
    nickname: str | None = Field(default=None, max_length=16)


LABEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}


def _format(schema: dict[str, Any], name: str = "out") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=900)


@pytest.mark.timeout(900)  # 20 sampled answers of up to 160 tokens on a CPU
async def test_structured_parse_gives_a_parsed_object_twenty_times_at_temperature_one(
    oai: AsyncOpenAI,
) -> None:
    async def one() -> Any:
        return await oai.chat.completions.parse(
            model=MODEL,
            messages=CITY,
            response_format=City,
            temperature=1,
            max_tokens=300,  # type: ignore[arg-type]
        )

    # Concurrent, so that the constrained rows share engine steps (and each other's masks).
    completions = await asyncio.gather(*(one() for _ in range(20)))
    for completion in completions:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, City), choice.message.content
        assert len(choice.message.parsed.landmarks) <= 2


async def test_structured_json_object_is_a_json_object(oai: AsyncOpenAI) -> None:
    done = await oai.chat.completions.create(
        model=MODEL,
        messages=FRANCE,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].message.content or ""), dict)


async def test_structured_job_output_validates_and_plain_rows_beside_it_are_unchanged(
    client: httpx.AsyncClient,
) -> None:
    plain = {"messages": FRANCE, "max_tokens": 24, "temperature": 0}
    alone = await wait_job(client, (await submit(client, **plain))["id"])
    constrained = [
        await submit(
            client, messages=CITY, max_tokens=60, temperature=1, response_format=_format(LABEL_SCHEMA)
        )
        for _ in range(4)
    ]
    beside = await submit(client, **plain)
    jobs = [await wait_job(client, j["id"]) for j in [*constrained, beside]]
    for job in jobs[:-1]:
        assert job["status"] == "succeeded" and job["finish_reason"] == "stop", job
        jsonschema.validate(json.loads(job["output"]), LABEL_SCHEMA)
        assert job["request"]["response_format"]["json_schema"]["schema"] == LABEL_SCHEMA
    # A greedy unconstrained job that shared its steps with masked rows: the same text as alone.
    assert (jobs[-1]["peak_batch_size"] or 0) > 1
    assert jobs[-1]["output"] == alone["output"]


async def test_structured_max_tokens_before_the_json_closes_is_length(oai: AsyncOpenAI) -> None:
    done = await oai.chat.completions.create(
        model=MODEL,
        messages=CITY,  # type: ignore[arg-type]
        response_format=_format(City.model_json_schema()),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=4,
    )
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 4
    with pytest.raises(ValueError):
        json.loads(done.choices[0].message.content or "")


@pytest.mark.timeout(900)
async def test_structured_batch_every_line_parses_against_the_schema(oai: AsyncOpenAI) -> None:
    # 200 lines of about 13 tokens each: about two minutes on two quiet CPU cores.
    lines = 200
    reviews = ["I loved it", "Terrible service", "It was fine", "Best meal ever", "Never again"]
    body = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Classify this review: {reviews[i % 5]} ({i})"}],
                "response_format": _format(LABEL_SCHEMA, "review"),
                "max_tokens": 24,
            },
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(line) + "\n" for line in body).encode()
    file = await oai.files.create(file=("reviews.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await oai.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 840
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(1)
        batch = await oai.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.completed == lines
    assert batch.output_file_id is not None
    results = [json.loads(x) for x in (await oai.files.content(batch.output_file_id)).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in body)
    for result in results:
        answer = result["response"]["body"]["choices"][0]
        assert answer["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(answer["message"]["content"]), LABEL_SCHEMA)


@pytest.mark.parametrize(
    ("response_format", "param", "message"),
    [
        ({"type": "xml"}, "response_format.type", "Input should be"),
        (_format({"type": "object", "properties": 5}), "response_format.json_schema.schema", ""),
        (_format({"type": "wat"}), "response_format.json_schema.schema", SCHEMA_INVALID.split(":")[0]),
        (
            _format({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
            "response_format.json_schema.schema",
            SCHEMA_UNSUPPORTED.split(":")[0],
        ),
        (
            _format({"type": "string", "description": "x" * 40_000}),
            "response_format.json_schema.schema",
            SCHEMA_TOO_LARGE.split(" is ")[0],
        ),
        ({"type": "json_schema"}, "response_format", "json_schema with a 'name'"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", ""),
    ],
)
async def test_structured_bad_response_format_is_a_400_naming_the_field(
    oai: AsyncOpenAI, client: httpx.AsyncClient, response_format: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(
            model=MODEL,
            messages=FRANCE,  # type: ignore[arg-type]
            response_format=response_format,  # type: ignore[arg-type]
            max_tokens=5,
        )
    body: Any = err.value.body
    assert body["param"] == param, body
    assert message in body["message"]
    # The job API takes the same field, checked by the same code.
    resp = await client.post("/v1/jobs", json={"messages": FRANCE, "response_format": response_format})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


async def test_structured_responses_parse_text_format_gives_a_parsed_object(
    oai: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    """`text.format` on the Responses route runs the same grammar: the SDK's responses.parse sends a
    strict json_schema and parses the answer into the model."""
    raw = await oai.responses.with_raw_response.parse(
        model=MODEL, input=CITY[0]["content"], text_format=City, temperature=1, max_output_tokens=300
    )
    response = raw.parse()
    assert response.status == "completed"
    assert isinstance(response.output_parsed, City), response.output_text
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    job = await wait_job(client, raw.headers["x-inferq-job-id"])
    assert job["request"]["response_format"]["type"] == "json_schema"

    plain = await oai.responses.create(
        model=MODEL,
        input="What is the capital of France?",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=200,
    )
    assert isinstance(json.loads(plain.output_text), dict)
    assert (
        plain.text is not None and plain.text.format is not None and plain.text.format.type == "json_object"
    )


@pytest.mark.parametrize(
    ("text_format", "param"),
    [
        ({"type": "json_schema", "name": "x", "schema": {"type": "wat"}}, "text.format.schema"),
        ({"type": "json_schema", "name": "x"}, "text.format"),
        ({"type": "json_object", "schema": {"type": "object"}}, "text.format"),
        ({"type": "xml"}, "text.format.type"),
    ],
)
async def test_structured_responses_bad_text_format_is_a_400_naming_the_field(
    client: httpx.AsyncClient, text_format: dict[str, Any], param: str
) -> None:
    resp = await client.post(
        "/v1/responses", json={"model": MODEL, "input": "Hi", "text": {"format": text_format}}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()
