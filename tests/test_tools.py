"""Tool calling on the real stack: the demo model's calls follow the tools' schemas because the worker
masks its logits with a grammar (shared/tools.py), whatever the sampling; and a real agent framework
(openai-agents) runs a tool round trip against inferq."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from openai import AsyncOpenAI
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.requests import (
    FutureRequestState,
    RequestState,
    RequestStatus,
)

from shared.settings import ModelSettings
from shared.tool_parsers import CallStream, parser_for
from shared.tools import (
    TOOL_CHOICE_WITHOUT_TOOLS,
    TOOLS_TOO_LARGE,
    UNANSWERED_TOOL_MESSAGE,
    UNKNOWN_FUNCTION,
    request_grammar,
)
from tests.conftest import Stack
from tests.helpers import iter_sse, submit, wait_job
from worker.engine import SamplingOptions
from worker.grammar import Grammars
from worker.model import load_model
from worker.sampling import BatchSampler

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
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]


@pytest.fixture
async def oai(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=900)


def _valid(calls: list[Any], names: frozenset[str] = frozenset(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        function = call["function"] if isinstance(call, dict) else call.function
        name, arguments = (
            (function["name"], function["arguments"])
            if isinstance(function, dict)
            else (
                function.name,
                function.arguments,
            )
        )
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.timeout(900)  # 20 sampled answers on a CPU
async def test_tools_required_at_temperature_one_gives_one_valid_call_twenty_times(oai: AsyncOpenAI) -> None:
    async def one(i: int) -> Any:
        city = CITIES[i % len(CITIES)]
        return await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Is it raining in {city}? ({i})"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1,
            max_tokens=120,
        )

    # Concurrent, so that the constrained rows share engine steps (and each other's masks).
    completions = await asyncio.gather(*(one(i) for i in range(20)))
    for completion in completions:
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls or []
        assert len(calls) == 1, choice  # parallel_tool_calls false: exactly one
        _valid(calls)
        assert calls[0].id.startswith("call_") and calls[0].type == "function"
        assert choice.message.content is None


async def test_tools_named_function_is_the_one_called(oai: AsyncOpenAI) -> None:
    for city in CITIES[:3]:
        done = await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"What is the weather in {city}?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=0.7,
            max_tokens=120,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        assert {c.function.name for c in choice.message.tool_calls} == {"get_time"}  # type: ignore[union-attr]
        _valid(choice.message.tool_calls, frozenset({"get_time"}))


async def test_tools_parallel_calls_and_the_stream_reassembles_to_the_same_calls(oai: AsyncOpenAI) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 120,
    }
    whole = await oai.chat.completions.create(**body)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) >= 2, choice  # this prompt, greedy: two calls (celsius, then fahrenheit)
    _valid(calls)
    assert len({c.id for c in calls}) == len(calls)

    stream = await oai.chat.completions.create(**body, stream=True)
    built: dict[int, dict[str, Any]] = {}
    content = ""
    reasons = []
    async for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
            for delta in c.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in built and delta.type == "function"
                    assert delta.function is not None and delta.function.name
                    built[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                assert delta.function is not None
                built[delta.index]["arguments"] += delta.function.arguments or ""
    assert reasons == ["tool_calls"] and content == ""
    assert [(b["name"], b["arguments"]) for _, b in sorted(built.items())] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert all(b["id"].startswith("call_") for b in built.values())


async def test_tools_auto_lets_the_model_write_text_and_a_started_call_completes_valid(
    oai: AsyncOpenAI,
) -> None:
    # Plain question: the greedy model answers in text; `auto` leaves it free.
    text = await oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=TOOLS,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=30,
    )
    assert text.choices[0].message.content and not text.choices[0].message.tool_calls
    assert text.choices[0].finish_reason in ("stop", "length")

    # A conversation whose assistant answered such questions with calls: it starts a call again (8 in 8
    # without a grammar), and once its marker is out the grammar holds it to a complete, valid call.
    def called(i: int, city: str) -> dict[str, Any]:
        arguments = json.dumps({"city": city, "unit": "celsius"})
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    history = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        called(1, "Oslo"),
        {"role": "user", "content": "What is the weather in Rome?"},
        called(2, "Rome"),
        {"role": "user", "content": "What is the weather in Lima?"},
    ]
    started = 0
    for _ in range(4):
        done = await oai.chat.completions.create(
            model=MODEL,
            messages=history,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="auto",
            temperature=1,
            max_tokens=150,
        )
        choice = done.choices[0]
        if choice.message.tool_calls:
            started += 1
            assert choice.finish_reason == "tool_calls"
            _valid(choice.message.tool_calls)
        else:
            assert "<tool_call>" not in (choice.message.content or ""), choice
    assert started >= 1


async def test_tools_chat_round_trip_call_result_answer(oai: AsyncOpenAI) -> None:
    first = await oai.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    message = first.choices[0].message
    assert message.tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    follow = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    answer = await oai.chat.completions.create(
        model=MODEL,
        messages=follow,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    final = answer.choices[0]
    assert final.finish_reason in ("stop", "length") and final.message.content
    assert not final.message.tool_calls


async def test_tools_job_records_its_calls_and_its_events_say_tool_calls(client: httpx.AsyncClient) -> None:
    job = await submit(
        client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0
    )
    assert job["status"] == "queued"
    done = await wait_job(client, job["id"])
    assert done["status"] == "succeeded" and done["finish_reason"] == "tool_calls", done
    assert len(done["tool_calls"]) == 1
    _valid(done["tool_calls"])
    assert done["output"].startswith("<tool_call>")  # the model's text, as written
    assert done["request"]["tool_choice"] == "required" and done["request"]["parallel_tool_calls"] is False
    events = [e async for e in iter_sse(client, job["id"])]
    text = "".join(e.data["text"] for e in events if e.event == "token")
    assert text == done["output"]
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "tool_calls"
    # A job without tools has no tool_calls.
    plain = await wait_job(client, (await submit(client, messages=ASK, max_tokens=4))["id"])
    assert plain["tool_calls"] is None and plain["finish_reason"] != "tool_calls"


# The batch test's tool: a short prompt and a short call (a name, then a city of at most 12 letters, one
# token each at most), so that 200 lines stay cheap on a CPU and max_tokens always fits a whole call.
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"}},
    "required": ["city"],
    "additionalProperties": False,
}
CITY = {"type": "function", "function": {"name": "weather", "parameters": CITY_SCHEMA}}


@pytest.mark.timeout(900)
async def test_tools_batch_every_line_calls_validly(oai: AsyncOpenAI) -> None:
    lines = 200
    body = [
        {
            "custom_id": f"t{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Weather in {CITIES[i % 5]}? ({i})"}],
                "tools": [CITY],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "temperature": 1,
                # A call is 26 tokens of fixed text, a city of 12 at most and the end: 39 as the tokenizer
                # splits them; the margin is for a sampled model that splits the fixed text finer.
                "max_tokens": 64,
            },
        }
        for i in range(lines)
    ]
    data = "".join(json.dumps(line) + "\n" for line in body).encode()
    file = await oai.files.create(file=("tools.jsonl", io.BytesIO(data)), purpose="batch")
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
        assert answer["finish_reason"] == "tool_calls", result
        (call,) = answer["message"]["tool_calls"]
        assert call["function"]["name"] == "weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), CITY_SCHEMA)


def test_tools_grammar_keeps_up_with_a_request_the_engine_restarts(model_dir: Path) -> None:
    """When the KV cache runs out, transformers restarts a request (a soft reset: its generated tokens
    move into its prompt, and it is prefilled again). The token drawn in the step just before the
    restart had not been given to the grammar yet; the matcher must still see it, or it guides a call one
    token behind the text, which then parses as no call at all (finish_reason 'stop' under `required`:
    the one line in 40 of the batch test). Here the real sampler, grammar and transformers request state
    run a `required` answer from random logits, restarted every few steps as the offloading manager does."""
    model, tokenizer = load_model(str(model_dir), ModelSettings())
    vocab, eos = int(model.config.vocab_size), int(tokenizer.eos_token_id)
    request = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    grammar = request_grammar(request)
    assert grammar is not None
    processors = LogitsProcessorList(
        [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.95)]
    )
    sampler = ContinuousBatchingLogitsProcessorList(processors, per_request_processors=True)
    sampler.__class__ = BatchSampler
    assert isinstance(sampler, BatchSampler)
    generator = torch.Generator().manual_seed(25)
    restarts = 0
    for attempt in range(5):  # five answers, each restarted every third step
        sampler.constraints = {"r": Grammars(tokenizer, vocab, eos).tool_constraint(grammar)}
        kwargs = SamplingOptions(200, 1.0, 1.0, None).processor_kwargs(vocab)
        state = RequestState(
            request_id="r",
            initial_tokens=[1, 2, 3],
            max_new_tokens=200,
            eos_token_id=eos,
            logit_processor_kwargs=kwargs,
        )
        state.status = RequestStatus.DECODING
        for step in range(200):
            if step % 3 == 2:  # what OffloadingManager.offload_requests does without a CPU swap pool
                state = state.create_equivalent_initial_request()
                state.status = RequestStatus.DECODING
                restarts += 1
            args = sampler.prepare_tensor_args(
                [FutureRequestState(state, True, {}, 1)], torch.zeros((3, 4), dtype=torch.int32)
            )
            logits = torch.randn((1, vocab), generator=generator)
            token = int(sampler(torch.zeros(1, dtype=torch.long), logits, args).argmax(-1))  # type: ignore[arg-type]
            if state.update_and_check_completion(token, None):
                break
        generated = state.to_generation_output().generated_tokens
        assert generated[-1] == eos, (attempt, tokenizer.decode(generated))
        text = tokenizer.decode(generated, skip_special_tokens=True)
        calls = parser_for().extract(text).calls
        assert len(calls) == 1, (attempt, text)
        jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
    assert restarts > 20


@pytest.mark.parametrize("city", ["</tool_call>", "<tool_call>", "a}\n</tool_call>"])
def test_tools_a_call_whose_argument_holds_a_call_marker_still_parses(city: str) -> None:
    """The grammar lets a string argument hold anything, the call markers too (a sampled model can write
    them there); the parser reads the call's JSON before looking for its closing marker."""
    arguments = json.dumps({"city": city, "unit": "celsius"})
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    calls = parser_for().extract(text).calls
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", arguments)]


@pytest.mark.parametrize("city", ["</tool_call>", "<tool_call>", "a}\n</tool_call>"])
def test_tools_a_streamed_call_whose_argument_holds_a_call_marker_streams_through_it(city: str) -> None:
    """Fed the answer a character at a time, as a stream is, the call's arguments go out as written,
    past the marker inside the string, and the call is done as soon as its arguments' JSON is, not
    only when the answer ends."""
    arguments = json.dumps({"city": city, "unit": "celsius"})
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    stream = CallStream()
    sent, done = "", []
    for n in range(1, len(text) + 1):
        for delta in stream.feed(text[:n]):
            assert not delta.content and delta.index == 0, delta
            if delta.done:
                done.append((n, delta.arguments))
            elif delta.name is None:
                sent += delta.arguments
                assert arguments.startswith(sent), (n, sent)
    assert sent == arguments
    assert done == [(text.index(arguments) + len(arguments), arguments)]  # as soon as its JSON closes
    assert stream.finish(text) == []  # nothing was held back for the end


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"tool_choice": "required"}, "tool_choice", TOOL_CHOICE_WITHOUT_TOOLS),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            UNKNOWN_FUNCTION.format(name="nope"),
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]},
            "tools.0.function.parameters",
            "not valid",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"if": {}, "then": {}}}}
                ]
            },
            "tools.0.function.parameters",
            "cannot be enforced",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name", ""),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "given twice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "description": "x" * 60_000, "parameters": WEATHER_SCHEMA},
                    }
                ]
            },
            "tools",
            TOOLS_TOO_LARGE.split("{")[0],
        ),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
            "messages.1.tool_call_id",
            UNANSWERED_TOOL_MESSAGE.format(id="call_x"),
        ),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", ""),
    ],
)
async def test_tools_bad_input_is_a_400_naming_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, message: str
) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 8, **extra}
    for route in (CHAT, "/v1/jobs"):
        resp = await client.post(route, json=body)
        assert resp.status_code == 400, (route, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param, (route, error)
        assert message in error["message"], (route, error)


@pytest.mark.timeout(600)
async def test_tools_openai_agents_runs_a_tool_round_trip_on_chat_completions(stack: Stack) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no traces sent anywhere
    seen: list[dict[str, Any]] = []

    @function_tool
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city.

        Args:
            city: The city.
            unit: celsius or fahrenheit.
        """
        seen.append({"city": city, "unit": unit})
        return json.dumps({"city": city, "temperature": 21, "unit": unit})

    client = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather using the tools.",
        tools=[get_weather],
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        # Required for the first turn (a 135M model would not call otherwise); the framework then resets
        # it to auto (reset_tool_choice) so that the turn after the result can answer in text.
        model_settings=ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60
        ),
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=6)
    assert seen and all(isinstance(c["city"], str) for c in seen)
    assert isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"


RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    }
]


async def test_tools_responses_function_call_streamed_and_answered_with_previous_response_id(
    oai: AsyncOpenAI,
) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "input": "What is the weather in Paris?",
        "tools": RESPONSES_TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_output_tokens": 80,
    }
    first = await oai.responses.create(**body)
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and len(first.output) == 1, first.output
    call = calls[0]
    assert call.call_id.startswith("call_") and call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    assert first.tools and first.tools[0].name == "get_weather"  # type: ignore[union-attr]

    # Streamed: the item, its argument pieces and their end, numbered in order; the same call.
    events = [e async for e in await oai.responses.create(**body, stream=True)]
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    added = [e for e in events if e.type == "response.output_item.added"]
    assert len(added) == 1 and added[0].item.type == "function_call"
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == pieces == call.arguments
    assert "response.output_text.delta" not in types
    # The same stream again, rebuilt by another request: the same numbers and pieces.
    response_id = events[-1].response.id  # type: ignore[union-attr]
    again = [e async for e in await oai.responses.retrieve(response_id, stream=True)]
    assert [e.sequence_number for e in again] == numbers

    # The result goes back with previous_response_id; the answer is text.
    second = await oai.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert second.output_text and not [i for i in second.output if i.type == "function_call"]
    items = await oai.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]


@pytest.mark.timeout(600)
async def test_tools_openai_agents_runs_a_tool_round_trip_on_responses(stack: Stack) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_time(timezone: str) -> str:
        """The time in a timezone.

        Args:
            timezone: The timezone.
        """
        seen.append(timezone)
        return "12:00"

    client = AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    agent = Agent(
        name="clock",
        instructions="You tell the time using the tools.",
        tools=[get_time],
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(
            tool_choice="get_time", parallel_tool_calls=False, temperature=0, max_tokens=60
        ),
    )
    result = await Runner.run(agent, "What time is it in Tokyo?", max_turns=6)
    assert seen and all(isinstance(t, str) for t in seen)
    assert isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
