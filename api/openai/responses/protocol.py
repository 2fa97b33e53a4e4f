"""The request of `POST /v1/responses` and its checks: what inferq honours, and a 400 naming every
field it does not (tools, reasoning, non-text inputs, other formats), never a field silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.http.errors import InvalidRequest
from shared.schemas import ResponseFormat

UNSUPPORTED_FIELD = "'{field}' is not supported by this server"
UNKNOWN_FIELD = "unknown field '{field}'"
BACKGROUND_NEEDS_STORE = "background responses must be stored: 'store' cannot be false with 'background'"
EMPTY_INPUT = "input must not be empty"
NON_TEXT_PART = "content parts of type '{type}' are not supported; only input_text and output_text"
NON_MESSAGE_ITEM = (
    "input items of type '{type}' are not supported; only message, function_call and function_call_output"
)
NON_FUNCTION_TOOL = "tools of type '{type}' are not supported; only function"
BAD_TOOL_CHOICE = 'tool_choice must be none, auto, required or {"type": "function", "name": ...}'
ITEM_FIELD = "'{field}' must be a string"
BAD_ROLE = "role must be one of user, assistant, system, developer"
BAD_CONTENT = "content must be a string or a list of text parts"
FORMAT_SCHEMA_MISSING = "a 'name' and a 'schema' object are required for type 'json_schema'"
FORMAT_SCHEMA_EXTRA = "name, description, schema and strict are only allowed with type 'json_schema'"
METADATA_SHAPE = (
    "metadata holds at most 16 string values, keys of at most 64 and values of at most 512 characters"
)

# Fields of OpenAI's request that inferq accepts when they ask for nothing it lacks.
_NEUTRAL: dict[str, Any] = {
    "truncation": lambda v: v in (None, "disabled"),
    "include": lambda v: v in (None, []),
    "service_tier": lambda v: v in (None, "auto", "default"),
    "stream_options": lambda v: v is None or v == {} or v == {"include_obfuscation": False},
    "reasoning": lambda v: v is None,
    "top_logprobs": lambda v: v in (None, 0),
    "max_tool_calls": lambda v: v is None,
    "prompt": lambda v: v is None,
    "conversation": lambda v: v is None,
}
# Fields OpenAI defines that inferq cannot honour yet: named in the 400, unlike a misspelt field.
_KNOWN_UNSUPPORTED = frozenset(
    {
        *_NEUTRAL,
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "background_options",
        "moderation",
        "access_programs",
        "context_management",
        "prompt_cache_options",
    }
)

Role = Literal["user", "assistant", "system", "developer"]


class TextFormat(BaseModel):
    """`text` (the default), `json_object`, or `json_schema` with the schema's fields beside `type` (the
    Responses API's flat shape): enforced by the same grammar as chat's `response_format`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        given = [n for n in ("name", "description", "json_schema", "strict") if getattr(self, n) is not None]
        if self.type == "json_schema" and (self.name is None or self.json_schema is None):
            raise ValueError(FORMAT_SCHEMA_MISSING)
        if self.type != "json_schema" and given:
            raise ValueError(FORMAT_SCHEMA_EXTRA)
        return self

    def response_format(self) -> ResponseFormat | None:
        """The chat `response_format` a job runs with (None: plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        spec: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "schema": self.json_schema,
            "strict": self.strict,
        }
        return ResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}
        )


def format_param(param: str | None) -> str | None:
    """A job's `response_format...` field as the Responses request names it (`text.format...`), and a
    tool's `tools.N.function.x` as `tools.N.x`; the job's messages are the request's input (after any
    earlier response's)."""
    if param is not None and param.startswith("messages"):
        return "input"
    if param is not None and param.startswith("tools."):
        return param.replace(".function.", ".", 1)
    if param is None or not param.startswith("response_format"):
        return param
    rest = param.removeprefix("response_format").removeprefix(".json_schema")
    return "text.format" + rest


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: None = Field(default=None, description="Not supported: leave unset.")


class ResponseCreateRequest(BaseModel):
    """Body of `POST /v1/responses` (OpenAI's Responses API), the subset a text model can honour."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A model inferq serves (see GET /v1/models).")
    input: str | list[dict[str, Any]] = Field(
        description="A string, or message items (roles user, assistant, system, developer) with text parts."
    )
    instructions: str | None = Field(default=None, max_length=1_000_000)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = False
    background: bool | None = False
    store: bool | None = True
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    previous_response_id: str | None = Field(default=None, max_length=64)
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=128,
        description="Function tools (`type`, `name`, `description`, `parameters`, `strict`); their calls "
        "follow their schemas (a grammar).",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="none, auto (the default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_shape(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError(METADATA_SHAPE)
        return value

    def check(self) -> None:
        """Refuse what inferq would otherwise have to ignore."""
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL and _NEUTRAL[name](value):
                continue
            message = UNSUPPORTED_FIELD if name in _KNOWN_UNSUPPORTED else UNKNOWN_FIELD
            raise InvalidRequest(message.format(field=name), param=name)
        if self.background and self.store is False:
            raise InvalidRequest(BACKGROUND_NEEDS_STORE, param="store")

    @property
    def echoed(self) -> dict[str, Any]:
        """The tool fields as the Response echoes them."""
        return {
            "tools": self.tools or [],
            "tool_choice": self.tool_choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "truncation": "disabled",
        }

    def chat_tools(self) -> dict[str, Any]:
        """The job fields of the request's tools (chat's shape); 400 naming a tool inferq cannot run."""
        fields: dict[str, Any] = {}
        if self.tools:
            tools = []
            for i, tool in enumerate(self.tools):
                if tool.get("type") != "function":
                    raise InvalidRequest(
                        NON_FUNCTION_TOOL.format(type=tool.get("type")), param=f"tools.{i}.type"
                    )
                function = {k: v for k, v in tool.items() if k != "type"}
                tools.append({"type": "function", "function": function})
            fields["tools"] = tools
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise InvalidRequest(BAD_TOOL_CHOICE, param="tool_choice")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif choice is not None:
            if choice not in ("none", "auto", "required"):
                raise InvalidRequest(BAD_TOOL_CHOICE, param="tool_choice")
            fields["tool_choice"] = choice
        if self.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = self.parallel_tool_calls
        return fields


def _part_text(part: Any, param: str) -> tuple[str, str]:
    if not isinstance(part, dict):
        raise InvalidRequest(BAD_CONTENT, param=param)
    kind = part.get("type")
    if kind not in ("input_text", "output_text"):
        raise InvalidRequest(NON_TEXT_PART.format(type=kind), param=f"{param}.type")
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string", param=f"{param}.text")
    return kind, text


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as message items `{type, role, content: [{type, text}]}`; 400 on the first
    part inferq cannot take, naming it (e.g. `input.1.content.0.type`)."""
    if isinstance(value, str):
        if not value:
            raise InvalidRequest(EMPTY_INPUT, param="input")
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not value:
        raise InvalidRequest(EMPTY_INPUT, param="input")
    items = []
    for i, item in enumerate(value):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind in ("function_call", "function_call_output"):
            items.append(_call_item(item, where))
            continue
        if kind != "message":
            raise InvalidRequest(NON_MESSAGE_ITEM.format(type=kind), param=f"{where}.type")
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(BAD_ROLE, param=f"{where}.role")
        content = item.get("content")
        default = "output_text" if role == "assistant" else "input_text"
        if isinstance(content, str):
            parts = [{"type": default, "text": content}]
        elif isinstance(content, list) and content:
            parts = []
            for j, part in enumerate(content):
                _, text = _part_text(part, f"{where}.content.{j}")
                parts.append({"type": default, "text": text})
        else:
            raise InvalidRequest(BAD_CONTENT, param=f"{where}.content")
        items.append({"type": "message", "role": role, "content": parts})
    return items


def _call_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A function_call (a call the model made) or function_call_output (its result) input item."""
    fields = ("call_id", "name", "arguments") if item["type"] == "function_call" else ("call_id", "output")
    for name in fields:
        if not isinstance(item.get(name), str) or not item[name]:
            raise InvalidRequest(ITEM_FIELD.format(field=name), param=f"{where}.{name}")
    return {"type": item["type"], **{name: item[name] for name in fields}}


def as_chat(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as the chat messages a job runs: developer speaks as system; function_call items
    are an assistant message's calls (consecutive ones, one message), their outputs tool messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        else:
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": "".join(p["text"] for p in item["content"])})
    return messages
