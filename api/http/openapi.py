"""The OpenAPI schema as the API really behaves: FastAPI's generated one, post-processed (error responses,
streaming media types, and the request constraints the validators enforce but pydantic cannot express)."""

from __future__ import annotations

import copy
import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from api.openai.serving import JobFailed
from api.routes.files import PURPOSES
from api.tenancy.idempotency import HEADER as IDEMPOTENCY_HEADER
from api.tenancy.idempotency import MAX_KEY_CHARS
from shared.responses import EVENT_TYPES as RESPONSE_EVENT_TYPES

Schema = dict[str, Any]

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
BEARER = "bearerAuth"
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
_ERRORS: dict[int, tuple[str, dict[str, Any] | None]] = {
    400: ("The request is invalid; the error's `param` names the culprit.", None),
    401: ("An API key is required and was missing, unknown or revoked.", None),
    404: ("No such resource (for this key's tenant).", None),
    409: ("The resource's state or the Idempotency-Key forbids the request.", None),
    413: ("The request body is over the size limit.", None),
    429: ("Rate limit, daily token quota or queue depth reached; retry after `Retry-After`.", _RETRY_AFTER),
    500: ("The generation job failed.", None),
    503: ("Redis or Postgres is unreachable; retry after `Retry-After`.", _RETRY_AFTER),
}
# Operations tagged `health` are open to probes and scrapers (api/http/app.py); every other one is behind
# `authenticate`, which may answer 401 or 429. All but /healthz touch Redis or Postgres, which may be
# down (503).
_OPEN_TAG = "health"
_NO_BACKEND = {"/healthz"}
# Routes that take an Idempotency-Key (api/tenancy/idempotency.py): a reuse with another body, or while
# the first request is in flight, is a 409.
_IDEMPOTENT = {
    ("post", "/v1/jobs"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/batches"),
    ("post", "/v1/responses"),
}
# Other 409s and 500s, by route: state conflicts, and the OpenAI routes, which answer a job that ended
# cancelled with 409 and one that failed with 500 (as OpenAI does), since they wait for the job.
_EXTRA_ERRORS: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/jobs/{job_id}/cancel"): {409},
    ("post", "/v1/batches/{batch_id}/cancel"): {409},
    ("delete", "/v1/files/{file_id}"): {409},
    ("post", "/v1/chat/completions"): {409, JobFailed.status_code},
    ("post", "/v1/completions"): {409, JobFailed.status_code},
    ("post", "/v1/responses"): {404},  # a previous_response_id that names no response of this tenant
    ("delete", "/v1/jobs/{job_id}"): {409},  # still stopping after its cancel
    ("delete", "/v1/responses/{response_id}"): {409},
    ("get", "/v1/webhook_secret"): {404},  # the tenant has none yet
    ("get", "/metrics"): {401},  # open, unless INFERQ_METRICS_TOKEN is set
}
# One event of each stream, as Open API 3.1 describes Server-Sent Events (the 3.2 `itemSchema`).
_JOB_EVENT: Schema = {
    "type": "object",
    "required": ["event", "data", "id"],
    "properties": {
        "event": {"enum": ["status", "token", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "Pass as Last-Event-ID to resume."},
    },
}
_RESPONSE_EVENT: Schema = {
    "type": "object",
    "required": ["event", "data", "id"],
    "properties": {
        "event": {"enum": sorted(RESPONSE_EVENT_TYPES)},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The event's sequence_number."},
    },
}
_CHUNK_EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "A JSON chunk object, or `[DONE]` at the end."},
    },
}
_JSONL: Schema = {"type": "string", "description": "JSON Lines: one JSON object per line."}
_READY: Schema = {
    "type": "object",
    "required": ["status", "redis", "postgres"],
    "properties": {"status": {"const": "ready"}, "redis": {"const": "ok"}, "postgres": {"const": "ok"}},
}
_INT64_MAX = 2**63 - 1


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json) return the post-processed schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _post_process(copy.deepcopy(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_open(op: Schema) -> bool:
    return _OPEN_TAG in op.get("tags", [])


def _error_statuses(method: str, path: str, op: Schema) -> set[int]:
    statuses = set(_EXTRA_ERRORS.get((method, path), set()))
    params = op.get("parameters", [])
    if "requestBody" in op:
        statuses |= {400, 413}
    if any(p["in"] in ("query", "header") for p in params):
        statuses.add(400)
    if any(p["in"] == "path" for p in params):
        statuses.add(404)
    if (method, path) in _IDEMPOTENT:
        statuses.add(409)
    if not _is_open(op):
        statuses |= {401, 429}
    if path not in _NO_BACKEND:
        statuses.add(503)
    return statuses


def _error_response(status: int, description: str | None = None) -> Schema:
    default, headers = _ERRORS[status]
    response: Schema = {
        "description": description or default,
        "content": {"application/json": {"schema": dict(ERROR_REF)}},
    }
    if headers:
        response["headers"] = copy.deepcopy(headers)
    return response


def _fix_operation(method: str, path: str, op: Schema) -> None:
    responses: dict[str, Schema] = op["responses"]
    responses.pop("422", None)  # FastAPI's; validation errors are 400s here (api/http/errors.py)
    params = op.setdefault("parameters", [])
    if (method, path) in _IDEMPOTENT and all(p["name"] != IDEMPOTENCY_HEADER for p in params):
        params.append(
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "description": "A retry with the same key and body replays the first response.",
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
            }
        )
    wanted = _error_statuses(method, path, op)
    for code in list(responses):
        if code.isdigit() and int(code) >= 400 and int(code) not in wanted:
            del responses[code]  # declared app-wide, but this route cannot answer it
    for status in sorted(wanted):
        # Keep what a route says of its own errors; FastAPI's app-wide ones only have the status phrase.
        said = responses.get(str(status), {}).get("description")
        responses[str(status)] = _error_response(status, None if said == HTTPStatus(status).phrase else said)
    if not _is_open(op):
        # `auth = auto` (the default) serves without a key until one exists, so a key is optional here.
        op["security"] = [{BEARER: []}, {}]
    if not params:
        del op["parameters"]
    for response in responses.values():
        _fix_media_types(path, response)


def _fix_media_types(path: str, response: Schema) -> None:
    content: dict[str, Schema] = response.get("content", {})
    if "text/event-stream" in content:  # a job's own events, a response's, or an OpenAI route's chunks
        if path.startswith("/v1/responses"):
            event = _RESPONSE_EVENT
        else:
            event = _JOB_EVENT if path.endswith("/events") else _CHUNK_EVENT
        content["text/event-stream"] = {"schema": copy.deepcopy(event)}
    if "application/jsonl" in content:
        content["application/jsonl"] = {"schema": dict(_JSONL)}


def _fix_integer_bounds(node: Any) -> None:
    """pydantic writes 2**63 - 1 as a float, which rounds up to 2**63: a value the server refuses."""
    if isinstance(node, dict):
        for key in ("maximum", "minimum"):
            value = node.get(key)
            if isinstance(value, float) and value.is_integer():
                node[key] = _INT64_MAX if value == float(_INT64_MAX) else int(value)
        for child in node.values():
            _fix_integer_bounds(child)
    elif isinstance(node, list):
        for child in node:
            _fix_integer_bounds(child)


def _drop_unreferenced(schema: Schema, names: tuple[str, ...]) -> None:
    """Drop these components if nothing refers to them any more (in order: a dropped one may hold the
    last reference to the next)."""
    components: dict[str, Schema] = schema.get("components", {}).get("schemas", {})
    for name in names:
        rest = {k: v for k, v in components.items() if k != name}
        if name in components and f'"#/components/schemas/{name}"' not in json.dumps([schema["paths"], rest]):
            del components[name]


def _branches(schema: Schema | None) -> list[Schema]:
    """The alternatives of a property (pydantic writes `X | None` as an anyOf), null left out."""
    if schema is None:
        return []
    return [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]


def _fix_requests(components: dict[str, Schema]) -> None:
    """What the request validators refuse beyond pydantic's types (api/openai/protocol.py,
    shared/schemas.py): without it, the schema promises requests that are always answered 400."""

    def prop(model: str, name: str) -> Schema | None:
        found: Schema | None = components.get(model, {}).get("properties", {}).get(name)
        return found

    non_empty = {"type": "string", "minLength": 1}
    role = prop("ChatCompletionMessageParam", "role")
    if role is not None:
        role["enum"] = [r for r in role.get("enum", []) if r != "tool"]
    part = components.get("ContentPart")
    if part is not None:
        part["properties"].update(type={"const": "text"}, text={"type": "string"})
        part["required"] = ["type", "text"]
    for model in ("ChatCompletionRequest", "CompletionRequest", "JobCreateRequest"):
        stop = prop(model, "stop")
        if stop is not None:  # a string or a list of them, none empty (JobCreateRequest takes both too)
            stop["anyOf"] = [dict(non_empty), {"type": "array", "items": dict(non_empty)}, {"type": "null"}]
    prompt = prop("CompletionRequest", "prompt")
    if prompt is not None:
        one = {"type": "array", "items": dict(non_empty), "minItems": 1, "maxItems": 1}
        prompt["anyOf"] = [dict(non_empty), one]
    job = components.get("JobCreateRequest")
    if job is not None:  # exactly one of them, not null
        job["oneOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        ]
    for branch in _branches(prop("BatchCreateRequest", "metadata")):
        branch.update(
            maxProperties=16,
            propertyNames={"maxLength": 64},
            additionalProperties={"type": "string", "maxLength": 512},
        )


def _fix_upload(schema: Schema) -> None:
    """The multipart form of POST /v1/files: FastAPI names its schema after the route, so find it there."""
    op = schema["paths"].get("/v1/files", {}).get("post", {})
    form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
    name = form.get("$ref", "").rpartition("/")[2]
    purpose = (
        schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {}).get("purpose")
    )
    if purpose is not None:
        purpose["enum"] = list(PURPOSES)


def _fix_parameters(op: Schema) -> None:
    for param in op.get("parameters", []):
        if param["name"] == "Last-Event-ID":  # api/routes/events.py: an event id, digits only
            param["schema"] = {"type": "string", "pattern": "^[0-9]+$"}


def _post_process(schema: Schema) -> Schema:
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            _fix_operation(method, path, op)
            _fix_parameters(op)
    _fix_requests(schema.get("components", {}).get("schemas", {}))
    _fix_upload(schema)
    ready = schema["paths"].get("/readyz", {}).get("get")
    if ready is not None:  # a JSONResponse, so FastAPI knows nothing of its body
        ready["responses"]["200"]["content"]["application/json"]["schema"] = copy.deepcopy(_READY)
    _fix_integer_bounds(schema)
    _drop_unreferenced(schema, ("HTTPValidationError", "ValidationError"))
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An inferq API key: `Authorization: Bearer <key>`.",
    }
    return schema
