"""Reading a batch input file: which lines are unusable (the upload is refused, or the batch fails),
which requests are refused (each goes to the error file), and the jobs for the rest."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import ValidationError

from api.http.errors import ApiError, describe_validation
from api.http.services import Services
from api.jobs.submission import prepare_job
from api.openai.embeddings import EmbeddingRequest, prepare_embedding_job
from api.openai.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    BatchEndpoint,
    BatchError,
    ChatCompletionRequest,
    CompletionRequest,
)
from api.openai.responses.protocol import ResponseCreateRequest
from api.openai.responses.serving import format_params, response_job
from api.tenancy.auth import Principal
from shared import embeddings
from shared import responses as wire
from shared.models import Job
from shared.settings import BatchSettings

ENDPOINTS: tuple[str, ...] = get_args(BatchEndpoint)
MAX_CUSTOM_ID = 512
# Tokenizing is CPU work on the API's event loop: let other requests in every this many lines.
_YIELD_EVERY = 64

LINE_TOO_LONG = "the line is longer than {limit} bytes (a batch file is JSONL: one request per line)"
NOT_UTF8 = "the line is not UTF-8 text"
NOT_JSON = "the line is not valid JSON"
NUL_IN_LINE = "NUL characters (\\u0000) are not allowed"
NOT_OBJECT = "each line must be a JSON object"
BAD_CUSTOM_ID = f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
DUPLICATE_CUSTOM_ID = "custom_id '{custom_id}' is also on line {line}"
BAD_METHOD = "method must be 'POST'"
URL_NOT_BATCH_ENDPOINT = "url must be the batch's endpoint '{endpoint}'"
URL_UNSUPPORTED = "url must be one of: " + ", ".join(ENDPOINTS)
URL_NOT_FILE_ENDPOINT = "url must be '{endpoint}' as on line {line}: a batch has one endpoint"
BAD_BODY = "body must be a JSON object"
TOO_MANY_LINES = "a batch file holds at most {limit} requests"
NO_REQUESTS = "the file holds no requests"
STREAM_IN_BATCH = "stream is not available in a batch"


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


class _Bad(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = BatchError(code=code, message=message, param=param)


def _strip_newline(piece: bytes) -> bytes:
    return piece[:-2] if piece.endswith(b"\r\n") else piece[:-1]


class BatchFileReader:
    """Checks a batch input file line by line as its bytes arrive, with the rules that need no model.

    Lines end as `bytes.splitlines` ends them (\\n, \\r\\n or \\r; never U+2028, which JSON allows
    inside a string). A line longer than `max_line_bytes` is refused without being decoded or parsed,
    and the rest of the file is not read: a file with no line break is not JSONL. Every other line must
    be UTF-8, a JSON object with a custom_id unique in the file, method POST and a body object; its url
    must be the batch's endpoint or, at upload where there is no batch yet, a supported endpoint and
    the same on every line. Blank lines are skipped but counted, so line numbers are the file's.
    """

    def __init__(self, settings: BatchSettings, endpoint: str | None = None, *, keep: bool = True) -> None:
        self.settings = settings
        self.keep = keep  # at upload the requests themselves are not needed, only the verdict
        self.lines: list[_Line] = []
        self.errors: list[BatchError] = []  # the first max_errors_listed of them
        self.bad = 0  # all bad lines found
        self.count = 0  # requests (non-blank lines)
        self.stopped = False  # a line too long, or too many: the rest is not read
        self._endpoint = endpoint
        self._endpoint_line: int | None = None  # at upload, the line whose url set the file's endpoint
        self._number = 0
        self._tail = b""
        self._seen: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        if self.stopped:
            return
        pieces = (self._tail + chunk if self._tail else chunk).splitlines(keepends=True)
        # The last piece may continue in the next chunk (a "\r" too: "\n" may follow).
        self._tail = pieces.pop() if pieces and not pieces[-1].endswith(b"\n") else b""
        for piece in pieces:
            self._read(_strip_newline(piece))
            if self.stopped:
                return
        if len(self._tail) - self._tail.endswith(b"\r") > self.settings.max_line_bytes:
            self._read(self._tail)  # refused by its length alone; the bytes after it are not read

    def close(self) -> None:
        if self._tail and not self.stopped:
            self._read(_strip_newline(self._tail) if self._tail.endswith(b"\r") else self._tail)
        self._tail = b""
        if not self.count and not self.errors:
            self._error(BatchError(code="empty_file", message=NO_REQUESTS))

    def _error(self, error: BatchError) -> None:
        self.bad += 1
        if len(self.errors) < self.settings.max_errors_listed:
            self.errors.append(error)

    def _read(self, raw: bytes) -> None:
        self._number += 1
        number = self._number
        limits = self.settings
        if len(raw) > limits.max_line_bytes:
            message = LINE_TOO_LONG.format(limit=limits.max_line_bytes)
            self._error(BatchError(code="line_too_long", message=message, line=number))
            self.stopped = True
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(BatchError(code="invalid_encoding", message=NOT_UTF8, line=number))
            return
        if not text.strip():
            return
        self.count += 1
        if self.count > limits.max_lines:
            message = TOO_MANY_LINES.format(limit=limits.max_lines)
            self._error(BatchError(code="too_many_requests", message=message, line=number))
            self.stopped = True
            return
        try:
            line = self._check(number, text)
        except _Bad as bad:
            self._error(bad.error.model_copy(update={"line": number}))
            return
        if self.keep:
            self.lines.append(line)

    def _check(self, number: int, text: str) -> _Line:
        try:
            item = json.loads(text)
        except ValueError:
            raise _Bad("invalid_json", NOT_JSON) from None
        if "\x00" in json.dumps(item, ensure_ascii=False):
            raise _Bad("invalid_characters", NUL_IN_LINE)
        if not isinstance(item, dict):
            raise _Bad("invalid_request", NOT_OBJECT)
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise _Bad("missing_custom_id", BAD_CUSTOM_ID, "custom_id")
        if custom_id in self._seen:
            message = DUPLICATE_CUSTOM_ID.format(custom_id=custom_id, line=self._seen[custom_id])
            raise _Bad("duplicate_custom_id", message, "custom_id")
        self._seen[custom_id] = number
        if item.get("method") != "POST":
            raise _Bad("invalid_method", BAD_METHOD, "method")
        self._check_url(number, item.get("url"))
        if not isinstance(item.get("body"), dict):
            raise _Bad("invalid_body", BAD_BODY, "body")
        return _Line(number, custom_id, item["body"])

    def _check_url(self, number: int, url: Any) -> None:
        if self._endpoint is None:
            if url not in ENDPOINTS:
                raise _Bad("invalid_url", URL_UNSUPPORTED, "url")
            self._endpoint, self._endpoint_line = url, number
        elif url != self._endpoint:
            if self._endpoint_line is None:
                message = URL_NOT_BATCH_ENDPOINT.format(endpoint=self._endpoint)
            else:
                message = URL_NOT_FILE_ENDPOINT.format(endpoint=self._endpoint, line=self._endpoint_line)
            raise _Bad("invalid_url", message, "url")


def _refusal(line: _Line, message: str, param: str | None) -> dict[str, Any]:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return {"custom_id": line.custom_id, "line": line.number, "status_code": 400, "error": error}


async def _job_for(services: Services, line: _Line, endpoint: str, principal: Principal) -> Job:
    if endpoint == embeddings.ENDPOINT:
        return await prepare_embedding_job(services, EmbeddingRequest.model_validate(line.body), principal)
    if endpoint == wire.ENDPOINT:
        response = ResponseCreateRequest.model_validate(line.body)
        if response.stream:
            raise ValueError(STREAM_IN_BATCH)
        req, attrs = await response_job(services, response, principal)
        with format_params():
            return await prepare_job(services, req, principal, endpoint=endpoint, extra={"response": attrs})
    model = ChatCompletionRequest if endpoint == "/v1/chat/completions" else CompletionRequest
    body = model.model_validate(line.body)
    if body.stream:
        raise ValueError(STREAM_IN_BATCH)
    default = COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == "/v1/completions" else None
    return await prepare_job(
        services, body.to_job(), principal, default_max_tokens=default, endpoint=endpoint
    )


async def parse_batch_file(services: Services, content: bytes, endpoint: str, principal: Principal) -> Parsed:
    # Uploads are checked since this reader existed; a file stored before, or under other limits, may not be.
    reader = BatchFileReader(services.settings.batches, endpoint)
    reader.feed(content)
    reader.close()
    parsed = Parsed(errors=reader.errors)
    if reader.errors:
        return parsed
    for i, line in enumerate(reader.lines):
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
