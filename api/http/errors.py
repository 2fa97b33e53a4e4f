"""Error classes and the one handler that turns every failure into the OpenAI-shaped envelope."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import logs

log = logging.getLogger(__name__)

INVALID_JSON = "request body is not valid JSON"
JOB_NOT_FOUND = "no job with id '{job_id}'"
JOB_FINISHED = "job '{job_id}' is already {status} and cannot be cancelled"
BODY_TOO_LARGE = "request body is larger than the limit of {limit} bytes"
NUL_CHARACTER = "NUL characters (\\u0000) are not allowed in the URL or in request strings"
UNAVAILABLE = "a backing service ({service}) is unreachable; retry shortly"
INTERNAL = "internal server error"
MISSING_KEY = (
    "an API key is required: send 'Authorization: Bearer <key>' (the inferq CLI sends INFERQ_API_KEY); "
    "make one with `inferq keys create --tenant NAME`"
)
INVALID_KEY = "the API key is not valid (unknown, malformed or revoked)"
RATE_LIMITED = "rate limit reached: {limit} requests per {window}s for this key; retry in {retry}s"
QUOTA_EXHAUSTED = "daily token quota of {limit} tokens used up for this key; it resets at 00:00 UTC"
QUEUE_FULL = "the queue is {seconds:.0f}s deep, over the {limit:.0f}s limit; retry later"
# Stream tokens (api/streams/tokens.py): what is wrong with one, never whose job it names.
STREAM_TOKEN_INVALID = "the stream token is not valid (malformed or tampered with)"
STREAM_TOKEN_EXPIRED = "the stream token has expired; get a new one from POST /v1/jobs/{job_id}/stream_token"
STREAM_TOKEN_OTHER_JOB = "the stream token is for another job"
STREAM_TOKEN_REVOKED = "the API key that made this stream token has been revoked"
STREAM_TOKEN_OPEN = "this stream token was made while the API was open; API keys are required now"


class ApiError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class InvalidRequest(ApiError):
    pass


class NotFound(ApiError):
    status_code = 404
    type = "not_found_error"


class Conflict(ApiError):
    status_code = 409
    type = "conflict_error"


class PayloadTooLarge(ApiError):
    status_code = 413
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status_code = 401
    type = "authentication_error"


class TooManyRequests(ApiError):
    status_code = 429
    type = "rate_limit_error"


class ServiceUnavailable(ApiError):
    status_code = 503
    type = "service_unavailable_error"

    def __init__(self, service: str) -> None:
        super().__init__(UNAVAILABLE.format(service=service), headers={"Retry-After": "1"})


def envelope(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The envelope; `request_id` is the id the request-id middleware gave the request being served."""
    error = {
        "message": message,
        "type": type_,
        "param": param,
        "code": code,
        "request_id": logs.request_id.get(),
    }
    return {"error": error}


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Drop pydantic's union/branch markers such as 'list[str]' or 'function-after[...]'.
    parts = [p for p in parts if "[" not in p]
    return ".".join(parts) or None


def describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The message and `param` of the first of pydantic's validation errors."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return INVALID_JSON, None
    param = _validation_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation(exc.errors())
    return envelope(400, message, "invalid_request_error", param=param)


def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return envelope(exc.status_code, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return envelope(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))


def _on_redis(_: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", exc)
    return envelope(
        503, UNAVAILABLE.format(service="redis"), "service_unavailable_error", headers={"Retry-After": "1"}
    )


def _on_db(_: Request, exc: Exception) -> JSONResponse:
    log.warning("postgres unavailable: %s", exc)
    return envelope(
        503, UNAVAILABLE.format(service="postgres"), "service_unavailable_error", headers={"Retry-After": "1"}
    )


def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return envelope(500, INTERNAL, "internal_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RedisError, _on_redis)
    app.add_exception_handler(OperationalError, _on_db)
    app.add_exception_handler(DBAPIError, _on_db)
    app.add_exception_handler(OSError, _on_db)
    app.add_exception_handler(PoolTimeout, _on_db)  # every connection busy for pool_timeout: overloaded
    app.add_exception_handler(Exception, _on_unexpected)
