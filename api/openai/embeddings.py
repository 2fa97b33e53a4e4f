"""OpenAI's `/v1/embeddings` as jobs: the request checked and counted here, run by an embedding worker
(worker/embedder.py), answered from the job's stored vectors (shared/embeddings.py).

`input` is a string, a list of strings, a list of token ids, or a list of those. Token ids are the text's
tokens without the model's special ones, as a tokenizer gives them with `add_special_tokens=False`; the
worker adds the model's special tokens (e.g. BERT's [CLS] and [SEP]) around each input, as it does for
text, so that the ids of a text and the text itself give the same vector. `usage.prompt_tokens` counts
the tokens the model reads, special ones included.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.http.errors import InvalidRequest
from api.http.services import ModelInfo, Services
from api.jobs.submission import admit_and_enqueue, deadlines, resolve_model
from api.openai.serving import JOB_CANCELLED, JOB_FAILED, JOB_TIMED_OUT, JobCancelled, JobFailed
from api.tenancy.auth import Principal
from api.tenancy.ratelimit import quota_key
from shared import logs
from shared.embeddings import ENDPOINT, MAX_INPUTS, as_base64, as_floats, vector
from shared.models import Job, new_job_id
from shared.states import FinishReason, JobStatus

INPUT_EMPTY = "input must not be empty"
INPUT_EMPTY_STRING = "input must not contain empty strings"
INPUT_EMPTY_TOKENS = "input must not contain empty token arrays"
INPUT_SHAPE = (
    "input must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
)
INPUT_TOO_MANY = f"input holds at most {MAX_INPUTS} items"
INPUT_TOKEN_RANGE = "input[{index}] holds token id {token}, outside the model's vocabulary (0 to {last})"
INPUT_TOO_LONG = (
    "input[{index}] is {tokens} tokens (with the model's special tokens); model '{model}' takes at most "
    "{limit}"
)
DIMENSIONS_OVER = "dimensions must be at most {limit}, the size of model '{model}''s vectors"
# Tokenizing is CPU work on the API's event loop: a large request goes to a thread.
_TOKENIZE_IN_THREAD_CHARS = 20_000


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise_input(value: Any) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        if not value:
            raise ValueError(INPUT_EMPTY)
        return [value]
    if not isinstance(value, list):
        raise ValueError(INPUT_SHAPE)
    if not value:
        raise ValueError(INPUT_EMPTY)
    if all(_is_token(v) for v in value):
        return [list(value)]  # one input as token ids
    if len(value) > MAX_INPUTS:
        raise ValueError(INPUT_TOO_MANY)
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise ValueError(INPUT_EMPTY_STRING)
        return list(value)
    if all(isinstance(v, list) and all(_is_token(t) for t in v) for v in value):
        if any(not v for v in value):
            raise ValueError(INPUT_EMPTY_TOKENS)
        return [list(v) for v in value]
    raise ValueError(INPUT_SHAPE)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. Every field is honoured; any other is refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="An embedding model (GET /v1/models: capabilities.embeddings).")
    input: Any = Field(
        description="A string, a list of strings (at most 2048), token ids, or a list of token id lists."
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector as little-endian float32 bytes, as OpenAI sends."
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        description="Shorten the vectors to this size; only for models trained for it (capabilities).",
    )
    user: str | None = Field(default=None, max_length=256, description="Kept with the job's metadata.")

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> list[str] | list[list[int]]:
        return _normalise_input(value)


def _token_lengths(model: ModelInfo, inputs: list[str] | list[list[int]]) -> list[int]:
    """How many tokens the model reads for each input, its special tokens included."""
    tokenizer = model.tokenizer
    if inputs and isinstance(inputs[0], str):
        encoded = tokenizer(list(inputs), add_special_tokens=True)["input_ids"]
        return [len(ids) for ids in encoded]
    vocab = len(tokenizer)
    extra = int(tokenizer.num_special_tokens_to_add(pair=False))
    lengths = []
    for index, ids in enumerate(inputs):
        assert isinstance(ids, list)
        for token in ids:
            if not 0 <= token < vocab:
                raise InvalidRequest(
                    INPUT_TOKEN_RANGE.format(index=index, token=token, last=vocab - 1), param="input"
                )
        lengths.append(len(ids) + extra)
    return lengths


async def _count(model: ModelInfo, inputs: list[str] | list[list[int]]) -> int:
    limit = model.embedding.max_seq_length if model.embedding is not None else model.context_length
    chars = sum(len(i) for i in inputs)
    if chars > _TOKENIZE_IN_THREAD_CHARS:
        lengths = await asyncio.to_thread(_token_lengths, model, inputs)
    else:
        lengths = _token_lengths(model, inputs)
    for index, tokens in enumerate(lengths):
        if tokens > limit:
            raise InvalidRequest(
                INPUT_TOO_LONG.format(index=index, tokens=tokens, model=model.name, limit=limit),
                param="input",
            )
    return sum(lengths)


async def prepare_embedding_job(
    services: Services, body: EmbeddingRequest, principal: Principal, cancel_after: float | None = None
) -> Job:
    """Check an embeddings request against the model (its kind, its longest input, its vector size);
    the unsaved job that would run it."""
    model = resolve_model(services, body.model)
    request: dict[str, Any] = {
        "model": model.name,
        "endpoint": ENDPOINT,
        "input": body.input,
        "encoding_format": body.encoding_format,
    }
    if body.dimensions is not None:
        request["dimensions"] = body.dimensions
    if principal.key_id is not None and principal.tokens_per_day is not None:
        request["quota_key"] = quota_key(principal.key_id)  # the worker adds the tokens it embeds
    # An embeddings request to a chat model, or `dimensions` to a model not trained to be shortened.
    await services.capabilities.check(model.name, request)
    spec = model.embedding
    if body.dimensions is not None and spec is not None and body.dimensions > spec.native_dimensions:
        raise InvalidRequest(
            DIMENSIONS_OVER.format(limit=spec.native_dimensions, model=model.name), param="dimensions"
        )
    prompt_tokens = await _count(model, body.input)
    cancel_at, timeout = deadlines(services, cancel_after)
    return Job(
        id=new_job_id(),
        status=JobStatus.QUEUED.value,
        model=model.name,
        request=request,
        metadata_={"user": body.user} if body.user else None,
        prompt_tokens=prompt_tokens,
        attempts=0,
        tenant=principal.owner,
        api_key_id=principal.key_id,
        cancel_at=cancel_at,
        timeout_seconds=timeout,
        deadline_at=cancel_at,
    )


async def submit_embeddings(
    services: Services, body: EmbeddingRequest, principal: Principal, cancel_after: float | None = None
) -> Job:
    job = await prepare_embedding_job(services, body, principal, cancel_after)
    job.request_id = logs.request_id.get()
    # Its whole cost is its input: the fleet's rate of an embedding model is input tokens a second.
    return await admit_and_enqueue(services, job, job.prompt_tokens or 0)


async def load_with_vectors(services: Services, job_id: str) -> Job | None:
    """The job with its vectors (left out of other reads), read with the other waiters' jobs."""
    return await services.read_finished(job_id)


def render_embeddings(job: Job, blob: bytes | None) -> dict[str, Any]:
    """The OpenAI embeddings response of a finished job; an error for a failed or cancelled one."""
    if job.status == JobStatus.FAILED.value:
        raise JobFailed(JOB_FAILED.format(job_id=job.id, message=job.error_message or job.error_type))
    if job.status != JobStatus.SUCCEEDED.value or blob is None:
        timed_out = job.finish_reason == FinishReason.TIMEOUT.value
        raise JobCancelled((JOB_TIMED_OUT if timed_out else JOB_CANCELLED).format(job_id=job.id))
    count = len(job.request.get("input") or [])
    base64 = job.request.get("encoding_format") == "base64"
    data = []
    for index in range(count):
        raw = vector(blob, index, count)
        data.append(
            {"object": "embedding", "index": index, "embedding": as_base64(raw) if base64 else as_floats(raw)}
        )
    tokens = job.prompt_tokens or 0
    return {
        "object": "list",
        "data": data,
        "model": job.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
