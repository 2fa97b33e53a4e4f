"""A response job as OpenAI's Response object: the status mapping, its one output message, its usage.

`job.request["response"]` keeps what the Response echoes and what the job itself does not need:
`background`, `store`, `instructions`, `previous_response_id`, the input items (with their ids),
`user`, and where in the job's messages this response's own input starts.
"""

from __future__ import annotations

from typing import Any, Literal

from shared import responses as wire
from shared.models import Job
from shared.states import FinishReason, JobStatus
from shared.tool_parsers import call_id, item_id, parsed_answer

Phase = Literal["created", "in_progress", "final"]

_STATUS = {
    JobStatus.QUEUED.value: "queued",
    JobStatus.RUNNING.value: "in_progress",
    JobStatus.FAILED.value: "failed",
    JobStatus.CANCELLED.value: "cancelled",
    JobStatus.EXPIRED.value: "cancelled",  # its deadline passed before it started: it never ran
}


def attrs(job: Job) -> dict[str, Any]:
    response: dict[str, Any] = job.request.get("response") or {}
    return response


def is_response(job: Job) -> bool:
    return job.request.get("endpoint") == wire.ENDPOINT


def status(job: Job) -> str:
    if job.status == JobStatus.SUCCEEDED.value:
        return "incomplete" if job.finish_reason == FinishReason.LENGTH.value else "completed"
    return _STATUS[job.status]


def output_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def item_status(job: Job) -> str:
    return "completed" if status(job) == "completed" else "incomplete"


def message(job: Job, text: str | None, item_status: str) -> dict[str, Any]:
    """The response's output message; `text` None: just added, no content part yet."""
    return {
        "id": wire.message_id(job.id),
        "type": "message",
        "role": "assistant",
        "status": item_status,
        "content": [] if text is None else [output_part(text)],
    }


def function_call(job: Job, index: int, name: str, arguments: str, item_status: str) -> dict[str, Any]:
    """The response's `index`-th call as a function_call output item."""
    return {
        "id": item_id(job.id, index),
        "type": "function_call",
        "status": item_status,
        "call_id": call_id(job.id, index),
        "name": name,
        "arguments": arguments,
    }


def output_items(job: Job) -> list[dict[str, Any]]:
    """A finished response's output: its message, and (for one with tools) its calls."""
    parsed = parsed_answer(job.request, job.output)
    if parsed is None or not parsed.calls:
        return [message(job, job.output or "", item_status(job))]
    items = [] if parsed.content is None else [message(job, parsed.content, "completed")]
    for i, call in enumerate(parsed.calls):
        items.append(function_call(job, i, call.name, call.arguments, "completed"))
    return items


def ran(job: Job) -> bool:
    """Whether the job ever started (and so has an output message)."""
    return job.started_at is not None


def _usage(job: Job) -> dict[str, Any] | None:
    if job.prompt_tokens is None or job.status not in (
        JobStatus.SUCCEEDED.value,
        JobStatus.CANCELLED.value,
        JobStatus.FAILED.value,
        JobStatus.EXPIRED.value,
    ):
        return None
    output = job.completion_tokens or 0
    return {
        "input_tokens": job.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": job.prompt_tokens + output,
    }


def render(job: Job, phase: Phase = "final") -> dict[str, Any]:
    """The Response as it stood at `phase`: as created (queued, or in progress when not in the
    background), as it started, or as the job stands now."""
    a = attrs(job)
    request = job.request
    if phase == "created":
        state = "queued" if a.get("background") else "in_progress"
    elif phase == "in_progress":
        state = "in_progress"
    else:
        state = status(job)
    final = phase == "final"
    output: list[dict[str, Any]] = []
    if final and ran(job) and job.status not in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
        output = output_items(job)
    error = None
    if final and job.status == JobStatus.FAILED.value:
        error = {"code": "server_error", "message": job.error_message or job.error_type or "failed"}
    incomplete = {"reason": "max_output_tokens"} if final and state == "incomplete" else None
    completed_at = None
    if final and state == "completed" and job.finished_at is not None:
        completed_at = int(job.finished_at.timestamp())
    return {
        "id": wire.response_id(job.id),
        "object": "response",
        "created_at": int(job.created_at.timestamp()),
        "status": state,
        "background": bool(a.get("background")),
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": a.get("instructions"),
        "max_output_tokens": a.get("max_output_tokens"),
        "metadata": job.metadata_ or {},
        "model": job.model,
        "output": output,
        "parallel_tool_calls": a.get("parallel_tool_calls", True),
        "previous_response_id": a.get("previous_response_id"),
        "store": a.get("store", True),
        "temperature": float(request.get("temperature", 1.0)),
        "text": {"format": a.get("text_format") or {"type": "text"}},
        "tool_choice": a.get("tool_choice", "auto"),
        "tools": a.get("tools") or [],
        "top_p": float(request.get("top_p", 1.0)),
        "truncation": "disabled",
        "usage": _usage(job) if final else None,
        "user": a.get("user"),
    }


def input_item(job: Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """One of a response's own input items as `GET .../input_items` lists it."""
    if item.get("type", "message") != "message":  # a function_call or function_call_output
        return {"id": wire.message_id(job.id, index), **item, "status": "completed"}
    content = item["content"]
    if item["role"] == "assistant":
        content = [output_part(part["text"]) for part in content]
    return {"id": wire.message_id(job.id, index), **item, "content": content, "status": "completed"}
