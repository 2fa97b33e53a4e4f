"""Engine capabilities: what each engine declares, how a fleet's are combined, and which field of a
request is refused (the table the API applies at submit)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from shared.capabilities import (
    NOT_HONOURED,
    Capabilities,
    common,
    declared,
    openai_http_engine,
    transformers_engine,
    vllm_engine,
)
from shared.logprobs import MAX_TOP_LOGPROBS
from shared.settings import WorkerSettings

CPU = transformers_engine("cpu")
GPU = transformers_engine("cuda:0")
HTTP = openai_http_engine()


@pytest.mark.parametrize(
    ("caps", "request_", "param"),
    [
        (CPU, {"n": 4, "logprobs": True, "top_logprobs": 20, "seed": 1, "top_k": 3, "stop": ["x"]}, None),
        (CPU, {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, None),
        (CPU, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        # A GPU worker runs the same sampler on its device: it honours what a CPU worker does.
        (GPU, {"n": 4, "logprobs": True, "top_logprobs": 20, "seed": 1, "top_k": 3, "stop": ["x"]}, None),
        (GPU, {"response_format": {"type": "json_object"}}, None),
        (GPU, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (HTTP, {"n": 2}, "n"),
        (HTTP, {"n": 1}, None),
        (HTTP, {"top_k": 1}, "top_k"),
        (HTTP, {"response_format": {"type": "json_object"}}, "response_format"),
        (HTTP, {"response_format": {"type": "text"}}, None),
        (HTTP, {"seed": 0, "stop": ["a"], "temperature": 0.5}, None),
        (CPU, {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, None),
        (GPU, {"tools": [{"type": "function", "function": {"name": "f"}}]}, None),
        (HTTP, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (HTTP, {"tools": []}, None),
    ],
)
def test_capabilities_refuse_the_first_field_not_honoured(
    caps: Capabilities, request_: dict[str, Any], param: str | None
) -> None:
    refused = caps.refusal(request_, "m")
    assert (refused[0] if refused else None) == param
    if refused and param != "top_logprobs":
        assert refused[1] == NOT_HONOURED.format(field=param, model="m", engines=caps.engine)


def test_capabilities_of_a_mixed_fleet_are_what_every_worker_honours() -> None:
    assert common([]) is None
    assert common([CPU, CPU]) == CPU
    mixed = common([CPU, GPU, HTTP])
    assert mixed is not None
    assert mixed.engine == "transformers, openai-http"
    honoured = (mixed.n, mixed.seed, mixed.logprobs, mixed.top_k, mixed.stop)
    assert honoured == (False, True, False, False, True)
    # A worker whose tokenizer llguidance could not read takes structured outputs away from its model.
    no_grammar = common([CPU, transformers_engine("cuda:0", grammars=False)])
    assert no_grammar is not None and not no_grammar.structured_outputs and no_grammar.seed
    assert Capabilities.from_json({**CPU.to_json(), "from_a_later_version": 1}) == CPU


def test_capabilities_declared_per_engine_and_device() -> None:
    assert declared("openai-http", "cpu") == HTTP
    assert declared("transformers", "cpu") == CPU and CPU.structured_outputs and CPU.max_top_logprobs == 20
    assert declared("transformers", "cuda:1") == GPU == CPU
    # A CPU worker whose tokenizer llguidance could not read has no structured outputs.
    assert not transformers_engine("cpu", grammars=False).structured_outputs
    # vLLM honours every checked field, on any device, and as many top_logprobs as OpenAI allows.
    vllm = declared("vllm", "cuda:0")
    assert vllm == vllm_engine() and vllm.engine == "vllm" and vllm.max_top_logprobs == 20
    request = {"n": 2, "logprobs": True, "top_logprobs": 20, "seed": 1, "top_k": 5, "stop": ["x"]}
    assert vllm.refusal({**request, "response_format": {"type": "json_object"}}, "m") is None
    assert common([vllm, HTTP]).refusal({"n": 2}, "m") == (  # type: ignore[union-attr]
        "n",
        NOT_HONOURED.format(field="n", model="m", engines="vllm, openai-http"),
    )
    # Tools are enforced by the same grammar masks, on the device the logits are on; on vLLM by the same
    # grammar given to vLLM; an openai-http worker beside a vllm one makes tools a 400 for the model.
    assert CPU.tools and GPU.tools and vllm.tools and not HTTP.tools
    tools = {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}
    assert vllm.refusal(tools, "m") is None
    assert common([vllm, HTTP]).refusal(tools, "m") == (  # type: ignore[union-attr]
        "tools",
        NOT_HONOURED.format(field="tools", model="m", engines="vllm, openai-http"),
    )
    assert not transformers_engine("cpu", grammars=False).tools


def test_capabilities_an_operator_declares_for_an_openai_http_upstream() -> None:
    assert HTTP == Capabilities(engine="openai-http", seed=True, stop=True)  # nothing declared
    full = openai_http_engine("n, logprobs,top_logprobs=20,top_k,response_format,seed,stop")
    assert full == replace(vllm_engine(), engine="openai-http", tools=False)  # all but tools
    assert full.refusal({"n": 2, "logprobs": True, "top_logprobs": 20, "top_k": 3}, "m") is None
    some = declared("openai-http", "cpu", "logprobs,top_logprobs=5")
    assert some.max_top_logprobs == 5 and not some.seed and not some.n
    assert some.refusal({"logprobs": True, "top_logprobs": 6}, "m")[0] == "top_logprobs"  # type: ignore[index]
    assert some.refusal({"seed": 1}, "m")[0] == "seed"  # type: ignore[index]
    assert openai_http_engine("logprobs,top_logprobs").max_top_logprobs == MAX_TOP_LOGPROBS
    for text, message in (
        ("n,beam_search", "unknown capability 'beam_search'"),
        ("tools", "unknown capability 'tools'"),  # the HTTP engines do not forward tool definitions
        ("top_logprobs=5", "top_logprobs needs logprobs"),
        ("logprobs,top_logprobs=21", "top_logprobs=K needs K from 1 to 20"),
        ("seed=1", "seed takes no value"),
    ):
        with pytest.raises(ValueError, match=message):
            openai_http_engine(text)
    # The setting is checked when settings are read: a worker with a typo does not start.
    with pytest.raises(ValidationError, match="unknown capability 'nn'"):
        WorkerSettings(upstream_capabilities="nn,seed")
