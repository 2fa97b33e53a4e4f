"""Tool calling: a request's `tools`, `tool_choice` and `parallel_tool_calls` as the prompt the model
sees and the llguidance grammar its output follows.

The API checks a request with `check` at submit time (building the grammar, cached), and the worker
builds the same grammar from the same stored request, as for `response_format` (shared/structured.py).

The call format is Hermes' (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the format of
Hermes 2 Pro, Qwen 2.5/3 and the models tuned after them; parsed by shared/tool_parsers.py):
- `required`: the answer is calls from its first token (exactly one with `parallel_tool_calls`
  false), to the given functions, with arguments valid against their schemas; a named function: one
  call to it (as OpenAI and vLLM answer it);
- `auto`: any text, until the model writes the call marker `<tool_call>`; from there a lazy grammar
  holds it to complete calls, and the answer ends after them (so text comes before calls, as in
  vLLM's Hermes parser);
- `none`: plain text, and the model is not shown the tools.

How the model sees the tools: a chat template that renders them in this format itself (it mentions
`tools` and `<tool_call>`) gets them as `tools`; any other template gets them as a block added to the
system message (DEFAULT_TOOLS_PROMPT, Qwen 2.5's wording), and earlier calls and results in the
history as Hermes text: an assistant message's calls as `<tool_call>` blocks, tool results as a user
message of `<tool_response>` blocks (consecutive results in one message).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

from llguidance import LLMatcher
from pydantic import BaseModel, ConfigDict, Field

from shared import structured
from shared.structured import JSON_OPTIONS

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
CALL_SEPARATOR = "\n"

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

TOOL_CHOICE_WITHOUT_TOOLS = "tool_choice is only allowed when tools are given"
UNKNOWN_FUNCTION = "tool_choice names function '{name}', which is not one of the tools"
DUPLICATE_FUNCTION = "function '{name}' is given twice in tools"
TOOLS_TOO_LARGE = "the tools' definitions are {size} bytes of JSON; the limit is {limit}"
PARAMETERS_REFUSED = "the parameters of function '{name}': {error}"
TOOLS_UNSUPPORTED = "the tools cannot be enforced: {error}"
TOOLS_WITH_RESPONSE_FORMAT = "response_format cannot be combined with tools (unless tool_choice is 'none')"
TOOLS_NEED_MESSAGES = "tools need 'messages' (a chat), not a raw 'prompt'"
UNANSWERED_TOOL_MESSAGE = "this tool message answers no earlier call: no assistant tool_calls had id '{id}'"

DEFAULT_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, '_' and '-', at most 64.")
    description: str | None = Field(default=None, max_length=65_536)
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON schema the arguments follow (enforced by a grammar)."
    )
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    """Calls to this one function only."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000, description="The arguments, as a JSON text.")


class ToolCall(BaseModel):
    """A call an assistant message made (in a conversation's history)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolsError(ValueError):
    """A tool request that cannot be run; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def choice_of(request: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """A stored request's tool_choice (None without tools): OpenAI's default is `auto` with tools."""
    if not request.get("tools"):
        return None
    choice = request.get("tool_choice")
    return "auto" if choice is None else choice


def calls_allowed(request: Mapping[str, Any]) -> bool:
    """Whether the request's answer may hold calls (its output is then parsed for them)."""
    choice = choice_of(request)
    return choice is not None and choice != "none"


def _functions(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [tool["function"] for tool in request.get("tools") or []]


def _parameters(function: Mapping[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    return dict(parameters) if isinstance(parameters, Mapping) else dict(EMPTY_PARAMETERS)


def grammar_key(request: Mapping[str, Any]) -> str | None:
    """What the grammar of a request depends on, canonical (None when its answer is plain text): the
    cache key of its grammar, on both sides."""
    choice = choice_of(request)
    if choice is None or choice == "none":
        return None
    functions = [{"name": f["name"], "parameters": _parameters(f)} for f in _functions(request)]
    parallel = request.get("parallel_tool_calls") is not False
    if isinstance(choice, Mapping):
        wanted = choice["function"]["name"]
        functions = [f for f in functions if f["name"] == wanted]
        mode, parallel = "required", False  # one call of that function, as OpenAI and vLLM answer it
    else:
        mode = str(choice)
    key = {"mode": mode, "parallel": parallel, "functions": functions}
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@lru_cache(maxsize=256)
def grammar(key: str) -> str:
    """The llguidance (Lark) grammar of a canonical grammar key; raises ToolsError.

    The fixed parts of a call (marker, name, the `arguments` key) are literals, so only the arguments
    are JSON the model writes, compact as in structured outputs; the arguments follow the function's
    schema (`%json`)."""
    spec = json.loads(key)
    rules = []
    names = []
    for i, function in enumerate(spec["functions"]):
        schema = {**function["parameters"], "x-guidance": JSON_OPTIONS}
        head = '{"name": ' + json.dumps(function["name"]) + ', "arguments": '
        rules.append(f"fn_{i}: {_lark_string(head)} args_{i} " + _lark_string("}"))
        rules.append(f"args_{i}: %json " + json.dumps(schema, ensure_ascii=False))
        names.append(f"fn_{i}")
    body = f"{_lark_string(CALL_SEPARATOR)} fn {_lark_string(CALL_SEPARATOR + CALL_END)}"
    more = f"({_lark_string(CALL_SEPARATOR)} call)*" if spec["parallel"] else ""
    if spec["mode"] == "auto":
        # Any text; the lazy `head` ends at the first marker, which commits the answer to calls.
        start = [
            f"start: TEXT | head {body} {more}",
            "TEXT: /(.|\\n)*/",
            f"head[lazy]: TEXT {_lark_string(CALL_START)}",
        ]
    else:
        start = [f"start: call {more}"]
    lines = [
        "%llguidance {}",
        *start,
        f"call: {_lark_string(CALL_START)} {body}",
        "fn: " + " | ".join(names),
        *rules,
    ]
    built = "\n".join(lines) + "\n"
    error = LLMatcher.validate_grammar(built)
    if error:
        raise ToolsError(TOOLS_UNSUPPORTED.format(error=error.strip()), "tools")
    return built


def request_grammar(request: Mapping[str, Any]) -> str | None:
    """The grammar a stored request's answer follows for its tools; None for plain text."""
    key = grammar_key(request)
    return None if key is None else grammar(key)


def check(request: Mapping[str, Any], max_bytes: int) -> None:
    """Submit-time check of a request's tools (a job's request dict): raises ToolsError naming the field."""
    tools = request.get("tools") or []
    choice = request.get("tool_choice")
    if not tools:
        if choice is not None:
            raise ToolsError(TOOL_CHOICE_WITHOUT_TOOLS, "tool_choice")
        _check_history(request)
        return
    if request.get("prompt") is not None:
        raise ToolsError(TOOLS_NEED_MESSAGES, "tools")
    size = len(json.dumps(tools, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        raise ToolsError(TOOLS_TOO_LARGE.format(size=size, limit=max_bytes), "tools")
    seen: set[str] = set()
    for i, function in enumerate(_functions(request)):
        name = function["name"]
        if name in seen:
            raise ToolsError(DUPLICATE_FUNCTION.format(name=name), f"tools.{i}.function.name")
        seen.add(name)
        try:
            # A schema checked as response_format's are (meta-schema, then llguidance): the same errors.
            structured.grammar(structured.canonical(_parameters(function)))
        except structured.SchemaError as exc:
            message = PARAMETERS_REFUSED.format(name=name, error=exc)
            raise ToolsError(message, f"tools.{i}.function.parameters") from None
    if isinstance(choice, Mapping) and choice["function"]["name"] not in seen:
        raise ToolsError(UNKNOWN_FUNCTION.format(name=choice["function"]["name"]), "tool_choice")
    if calls_allowed(request) and request.get("response_format") not in (None, {"type": "text"}):
        raise ToolsError(TOOLS_WITH_RESPONSE_FORMAT, "response_format")
    _check_history(request)
    key = grammar_key(request)
    if key is not None:
        grammar(key)


def _check_history(request: Mapping[str, Any]) -> None:
    """Every tool message answers a call an earlier assistant message made."""
    made: set[str] = set()
    for i, message in enumerate(request.get("messages") or []):
        for call in message.get("tool_calls") or []:
            made.add(call["id"])
        if message.get("role") == "tool" and message.get("tool_call_id") not in made:
            raise ToolsError(
                UNANSWERED_TOOL_MESSAGE.format(id=message.get("tool_call_id")), f"messages.{i}.tool_call_id"
            )


# How the model sees them -----------------------------------------------------------------------------


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template shows tools and calls in the Hermes format itself."""
    return bool(template) and "tools" in str(template) and CALL_START in str(template)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (the grammar's literal parts around its arguments)."""
    return f'{CALL_START}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CALL_END}'


def chat_messages(
    request: Mapping[str, Any], template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages to give the chat template, and its `tools` argument (None: not passed)."""
    messages: list[dict[str, Any]] = [dict(m) for m in request.get("messages") or []]
    has_calls = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    shown = calls_allowed(request)
    if not shown and not has_calls:
        return messages, None
    tools = [dict(t) for t in request.get("tools") or []] if shown else None
    if template_renders_tools(template):
        for m in messages:
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]
        return messages, tools
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        if m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            text = m.get("content") or ""
            m = {"role": m["role"], "content": "\n".join(([text] if text else []) + calls)}
        out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("tool_results", None)
    if tools:
        block = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None
