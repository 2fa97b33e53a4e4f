"""Pydantic models of the OpenAI requests and responses inferq speaks (the subset it can honour).

Unknown request fields are accepted and ignored, as OpenAI clients send many optional ones; fields
whose meaning inferq cannot honour (the prompt's logprobs with `echo`) are refused with a
clear 400 instead of being silently dropped. `response_format` is enforced (shared/structured.py),
`tools` too (shared/tools.py), and `logprobs` computed in the worker's sampler (shared/logprobs.py),
never ignored.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from shared.logprobs import (
    MAX_COMPLETION_LOGPROBS,
    MAX_TOP_LOGPROBS,
    TOP_LOGPROBS_WITHOUT_LOGPROBS,
    TokenLogprob,
)
from shared.schemas import ChatMessage, JobCreateRequest, ResponseFormat, Usage
from shared.tools import Tool, ToolCall, ToolChoice

ECHO_LOGPROBS_UNSUPPORTED = "logprobs with echo would need the prompt's logprobs, which are not supported"
NON_TEXT_CONTENT = "only text content parts are supported"
PROMPT_SHAPE = "prompt must be a string or a list holding exactly one string"
# OpenAI's own default for the legacy completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _completion_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatCompletionMessageParam(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="An assistant's earlier calls.")
    tool_call_id: str | None = Field(default=None, description="A tool message: the call it answers.")

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(value, list) and any(p.type != "text" or p.text is None for p in value):
            raise ValueError(NON_TEXT_CONTENT)
        return value

    def to_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            text = "".join(p.text or "" for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(
            role=role,
            content=text,
            tool_calls=self.tool_calls or None,
            tool_call_id=self.tool_call_id,
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A model that a live worker serves (see GET /v1/models).")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Extension (as in vLLM): top-k sampling."
    )
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(
        default=None,
        ge=1,
        description="How many choices to generate (at most the server's limit, 8 by default).",
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="`json_object` or `json_schema`: the output is JSON, enforced by a grammar."
    )
    user: str | None = Field(default=None, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def _job_fields(self, max_tokens: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
            "n": self.n if self.n and self.n > 1 else None,
            "response_format": self.response_format,
            "metadata": {"user": self.user} if self.user else None,
        }
        if self.temperature is not None:
            fields["temperature"] = self.temperature
        return {k: v for k, v in fields.items() if v is not None}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Takes precedence over max_tokens."
    )
    logprobs: bool | None = Field(default=None, description="Give each output token's log-probability.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the most likely tokens at each position, this many.",
    )
    tools: list[Tool] | None = Field(
        default=None, max_length=128, description="Functions the model may call; calls follow their schemas."
    )
    tool_choice: ToolChoice | None = Field(
        default=None,
        description="`auto` (the default with tools), `required`, a named function, or `none`: "
        "enforced by a grammar.",
    )
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError(TOP_LOGPROBS_WITHOUT_LOGPROBS)
        return value

    def to_job(self) -> JobCreateRequest:
        fields = self._job_fields(self.max_completion_tokens or self.max_tokens)
        if self.logprobs:
            fields.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return JobCreateRequest(messages=[m.to_message() for m in self.messages], **fields)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    echo: bool | None = False
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Give each output token's log-probability and this many most likely tokens.",
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(PROMPT_SHAPE)
        if (value if isinstance(value, str) else value[0]) == "":
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError(ECHO_LOGPROBS_UNSUPPORTED)
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_job(self) -> JobCreateRequest:
        fields = self._job_fields(self.max_tokens)
        if self.logprobs is not None:
            fields.update(logprobs=True, top_logprobs=self.logprobs)
        return JobCreateRequest(prompt=self.prompt_text, **fields)


# Responses ---------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="The calls the answer made (ids shared by every view of the job)."
    )


class ChoiceLogprobs(BaseModel):
    """A chat choice's logprobs, as OpenAI gives them."""

    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """A legacy completion choice's logprobs: `text_offset` counts characters of the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("chatcmpl-"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("cmpl-"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferq"
    workers: int = Field(description="Live workers serving this model.")
    capabilities: dict[str, Any] | None = Field(
        default=None,
        description="What every live worker of the model honours (with none live, what the configured "
        "engine declares): engine, n, logprobs, max_top_logprobs, seed, top_k, stop, structured_outputs, "
        "tools, embeddings. A request using a field marked false is a 400 naming it.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# Files and batches -------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=40)
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(
        default=None, description="Up to 16 string pairs (keys ≤ 64, values ≤ 512 characters)."
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return value


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
