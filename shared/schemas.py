"""Pydantic request and response models of the native jobs API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from shared.deadlines import parse_duration
from shared.logprobs import MAX_TOP_LOGPROBS, TOP_LOGPROBS_WITHOUT_LOGPROBS, TokenLogprob
from shared.states import JobStatus
from shared.tools import Tool, ToolCall, ToolChoice
from shared.webhooks import JobWebhookEvent

TOOL_CALLS_NOT_ASSISTANT = "only assistant messages carry tool_calls"
TOOL_MESSAGE_NEEDS_ID = "a tool message needs the tool_call_id of the call it answers"
TOOL_CALL_ID_NOT_TOOL = "only tool messages carry a tool_call_id"


class ChatMessage(BaseModel):
    """A chat message; an assistant's may carry the tool calls it made, and a `tool` message answers
    one of them (its `tool_call_id`)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(default="", max_length=1_000_000)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _tool_fields_with_their_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(TOOL_CALLS_NOT_ASSISTANT)
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError(TOOL_MESSAGE_NEEDS_ID)
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(TOOL_CALL_ID_NOT_TOOL)
        return self


RESPONSE_FORMAT_SCHEMA_MISSING = (
    "json_schema with a 'name' and a 'schema' object is required for type 'json_schema'"
)
RESPONSE_FORMAT_SCHEMA_EXTRA = "json_schema is only allowed with type 'json_schema'"


class JsonSchemaSpec(BaseModel):
    """OpenAI's `response_format.json_schema`. The schema is kept as given (its key is `schema`, which
    pydantic models cannot use as a field name, hence the alias)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict[str, Any] = Field(alias="schema", description="A JSON Schema the output follows.")
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    """`text` (the default), `json_object` (any JSON object) or `json_schema` (JSON that matches the
    schema): enforced token by token with a grammar in the worker."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError(RESPONSE_FORMAT_SCHEMA_MISSING)
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(RESPONSE_FORMAT_SCHEMA_EXTRA)
        return self


class SamplingParams(BaseModel):
    """What the engine needs to know about one generation; shared by every API shape."""

    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Sample among the k most likely tokens."
    )
    stop: list[str] | None = Field(default=None, description="Up to 4 strings that end the generation.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    response_format: ResponseFormat | None = Field(
        default=None, description="Structured output: a JSON object, or JSON that follows a schema."
    )
    n: int | None = Field(
        default=None,
        ge=1,
        description="How many outputs to generate for the prompt (at most the server's limit, 8 by default).",
    )
    logprobs: bool | None = Field(
        default=None,
        description="Give each generated token's log-probability (in the job, and in its token events).",
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the most likely tokens at each position, this many.",
    )
    tools: list[Tool] | None = Field(
        default=None,
        max_length=128,
        description="Functions the model may call (with `messages`); the calls follow their schemas.",
    )
    tool_choice: ToolChoice | None = Field(
        default=None,
        description="`auto` (the default with tools): text or calls; `required`: calls only; a named "
        "function: calls to it only; `none`: text only. Enforced by a grammar.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: at most one call per answer (default true)."
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError(TOP_LOGPROBS_WITHOUT_LOGPROBS)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class JobCreateRequest(SamplingParams):
    """Body of `POST /v1/jobs`: a chat (`messages`) or a raw `prompt`, exactly one of them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Model to run; defaults to the served model.")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, description="Chat messages.")
    prompt: str | None = Field(default=None, min_length=1, max_length=1_000_000, description="Raw prompt.")
    metadata: dict[str, Any] | None = Field(default=None, description="Small JSON object kept with the job.")
    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="A URL to POST the job to (signed with the tenant's secret, POST /v1/webhook_secret).",
    )
    webhook_events_filter: list[JobWebhookEvent] | None = Field(
        default=None,
        min_length=1,
        description="Which of the job's events go to `webhook`: `start`, `output` (the job as it "
        "generates, at most every 0.5 s, never retried), `completed` (the default).",
    )
    cancel_after: float | str | None = Field(
        default=None,
        description="A deadline from now, as the `Cancel-After` header: seconds, or a duration such as "
        "'30s', '5m', '1h30m'. Not started by then: the job ends `expired` without running; running: "
        "it is stopped (`cancelled`, finish_reason `timeout`) with its output so far kept.",
    )
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Most seconds of running time (queue time not counted); default and maximum from "
        "the settings. Past it the job is stopped as at its deadline.",
    )

    @field_validator("cancel_after")
    @classmethod
    def _duration(cls, value: float | str | None) -> float | None:
        if value is None:
            return None
        return parse_duration(str(value))

    @model_validator(mode="after")
    def _one_input(self) -> JobCreateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of 'prompt' and 'messages' must be given")
        return self

    def metadata_bytes(self) -> int:
        return len(json.dumps(self.metadata, separators=(",", ":"))) if self.metadata else 0


class JobUrls(BaseModel):
    self: str
    events: str
    cancel: str


class JobCreatedResponse(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    created_at: datetime
    urls: JobUrls


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_ms: float | None = Field(default=None, description="Created until a worker started it.")
    ttft_ms: float | None = Field(default=None, description="Created until the first token.")
    total_ms: float | None = Field(default=None, description="Created until finished.")
    tokens_per_s: float | None = Field(default=None, description="Generated tokens per second of running.")


class WebhookDeliveryStatus(BaseModel):
    id: str = Field(description="The webhook-id of every try.")
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None


class JobChoice(BaseModel):
    """One of the outputs of a job that asked for n > 1 (`output` is the first one's text)."""

    index: int
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None


class JobError(BaseModel):
    type: str
    message: str


class JobResponse(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: dict[str, Any]
    output: str | None
    logprobs: list[TokenLogprob] | None = Field(
        default=None, description="For a job that asked for logprobs: one per generated token."
    )
    choices: list[JobChoice] | None = Field(
        default=None, description="For a job that asked for n > 1: every output; usage counts them all."
    )
    tool_calls: list[ToolCall] | None = Field(
        default=None,
        description="For a job with tools whose answer made calls: the calls parsed from `output` "
        "(which keeps the model's text as written), with ids that every view of the job shares.",
    )
    finish_reason: str | None
    usage: Usage | None
    timings: Timings
    attempts: int
    worker_id: str | None
    peak_batch_size: int | None = Field(
        description="Most requests that shared one engine step with this job."
    )
    error: JobError | None
    metadata: dict[str, Any] | None
    request_id: str | None = Field(default=None, description="x-request-id of the request that made it.")
    waiting: str | None = Field(
        default=None, description="For a queued job that cannot start yet (GET of one job): why."
    )
    queue_position: int | None = Field(
        default=None, description="For a queued interactive job (GET of one job): 1 means it starts next."
    )
    eta_seconds: float | None = Field(default=None, description="When it should start, at the fleet's rate.")
    batch_id: str | None = Field(default=None, description="The batch this job runs a line of.")
    custom_id: str | None = Field(default=None, description="That line's custom_id.")
    data_removed: bool = Field(
        default=False, description="The prompt, output and events were removed; usage and timings stay."
    )
    cancel_at: datetime | None = Field(default=None, description="Its Cancel-After deadline, if it has one.")
    timeout_seconds: float | None = Field(default=None, description="Most seconds of running time.")
    deadline_at: datetime | None = Field(
        default=None,
        description="When it is stopped if still unfinished: the earlier of cancel_at and its first start "
        "plus timeout_seconds.",
    )
    webhooks: list[WebhookDeliveryStatus] | None = Field(
        default=None, description="For a job with a `webhook` (GET of one job): its deliveries so far."
    )
    urls: JobUrls


class JobListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobResponse]
    has_more: bool
    next_after: str | None = Field(description="Pass as `after` to get the next page.")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = Field(default=None, description="The request's x-request-id, for support.")


class ErrorResponse(BaseModel):
    error: ErrorBody
