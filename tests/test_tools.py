"""Tool calling on the real stack: the demo model's calls follow the tools' schemas because the worker
masks its logits with a grammar (shared/tools.py), whatever the sampling."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openai import AsyncOpenAI

from tests.conftest import Stack

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 20}},
    "required": ["timezone"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a timezone.", "parameters": TIME_SCHEMA},
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=900)


def _valid(calls: Any) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_tools_smoke(oai: AsyncOpenAI) -> None:
    for choice in ("required", "auto"):
        done = await oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,
            max_tokens=80,  # type: ignore[arg-type]
        )
        print(choice, done.model_dump_json(indent=1))
