"""Reading a batch input file: which lines are unusable (the batch fails), which requests are refused
(each goes to the error file), and the jobs for the rest."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.http.errors import ApiError, describe_validation
from api.http.services import Services
from api.jobs.submission import prepare_job
from api.openai.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    BatchError,
    ChatCompletionRequest,
    CompletionRequest,
)
from api.tenancy.auth import Principal
from shared.models import Job

MAX_CUSTOM_ID = 512
# Tokenizing is CPU work on the API's event loop: let other requests in every this many lines.
_YIELD_EVERY = 64


@dataclass
class Parsed:
    errors: list[BatchError] = field(default_factory=list)  # any of these fails the whole batch
    jobs: list[Job] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # refused requests, for the error file

    @property
    def total(self) -> int:
        return len(self.jobs) + len(self.rejected)


@dataclass
class _Line:
    number: int
    custom_id: str
    body: dict[str, Any]


def _shape_problem(item: dict[str, Any], endpoint: str) -> tuple[str, str, str] | None:
    if item.get("method") != "POST":
        return "invalid_method", "method must be 'POST'", "method"
    if item.get("url") != endpoint:
        return "invalid_url", f"url must be the batch's endpoint '{endpoint}'", "url"
    if not isinstance(item.get("body"), dict):
        return "invalid_body", "body must be a JSON object", "body"
    return None


def _structure(content: bytes, endpoint: str, max_lines: int) -> tuple[list[_Line], list[BatchError]]:
    """The lines that have the batch-line shape, and an error for each one that has not."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return [], [BatchError(code="invalid_file", message="the file is not UTF-8 text")]
    lines: list[_Line] = []
    errors: list[BatchError] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue

        def bad(code: str, message: str, param: str | None = None, n: int = number) -> None:
            errors.append(BatchError(code=code, message=message, param=param, line=n))

        try:
            item = json.loads(raw)
        except ValueError:
            bad("invalid_json", "the line is not valid JSON")
            continue
        if "\x00" in json.dumps(item, ensure_ascii=False):
            bad("invalid_characters", "NUL characters (\\u0000) are not allowed")
            continue
        if not isinstance(item, dict):
            bad("invalid_request", "each line must be a JSON object")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            bad(
                "missing_custom_id",
                f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters",
                "custom_id",
            )
            continue
        if custom_id in seen:
            bad(
                "duplicate_custom_id",
                f"custom_id '{custom_id}' is also on line {seen[custom_id]}",
                "custom_id",
            )
            continue
        seen[custom_id] = number
        problem = _shape_problem(item, endpoint)
        if problem is not None:
            bad(*problem)
        else:
            lines.append(_Line(number, custom_id, item["body"]))
    if not lines and not errors:
        errors.append(BatchError(code="empty_file", message="the file holds no requests"))
    if len(seen) > max_lines:
        errors.insert(
            0, BatchError(code="too_many_requests", message=f"a batch holds at most {max_lines} requests")
        )
    return lines, errors


def _refusal(line: _Line, message: str, param: str | None) -> dict[str, Any]:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return {"custom_id": line.custom_id, "line": line.number, "status_code": 400, "error": error}


async def _job_for(services: Services, line: _Line, endpoint: str, principal: Principal) -> Job:
    model = ChatCompletionRequest if endpoint == "/v1/chat/completions" else CompletionRequest
    body = model.model_validate(line.body)
    if body.stream:
        raise ValueError("stream is not available in a batch")
    default = COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == "/v1/completions" else None
    return await prepare_job(
        services, body.to_job(), principal, default_max_tokens=default, endpoint=endpoint
    )


async def parse_batch_file(services: Services, content: bytes, endpoint: str, principal: Principal) -> Parsed:
    settings = services.settings.batches
    lines, errors = _structure(content, endpoint, settings.max_lines)
    parsed = Parsed(errors=errors[: settings.max_errors_listed])
    if errors:
        return parsed
    for i, line in enumerate(lines):
        if i % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        try:
            job = await _job_for(services, line, endpoint, principal)
        except ValidationError as exc:
            parsed.rejected.append(_refusal(line, *describe_validation(exc.errors())))
            continue
        except ApiError as exc:
            parsed.rejected.append(_refusal(line, exc.message, exc.param))
            continue
        except ValueError as exc:
            parsed.rejected.append(_refusal(line, str(exc), "stream"))
            continue
        job.custom_id = line.custom_id
        job.batch_line = line.number
        parsed.jobs.append(job)
    return parsed
