"""The Responses API's wire names: ids, the route a response job records, and its stream event types.

A response is a job: `resp_<hex>` and `job_<hex>` name the same row, so any API process maps one to
the other without a lookup.
"""

from __future__ import annotations

from typing import Final

ENDPOINT: Final = "/v1/responses"  # request["endpoint"] of a job that is a response
RESPONSE_PREFIX: Final = "resp_"
MESSAGE_PREFIX: Final = "msg_"
JOB_PREFIX: Final = "job_"

CREATED: Final = "response.created"
QUEUED: Final = "response.queued"
IN_PROGRESS: Final = "response.in_progress"
ITEM_ADDED: Final = "response.output_item.added"
PART_ADDED: Final = "response.content_part.added"
TEXT_DELTA: Final = "response.output_text.delta"
TEXT_DONE: Final = "response.output_text.done"
PART_DONE: Final = "response.content_part.done"
ITEM_DONE: Final = "response.output_item.done"
ARGUMENTS_DELTA: Final = "response.function_call_arguments.delta"
ARGUMENTS_DONE: Final = "response.function_call_arguments.done"
COMPLETED: Final = "response.completed"
INCOMPLETE: Final = "response.incomplete"
FAILED: Final = "response.failed"
ERROR: Final = "error"
EVENT_TYPES: Final = frozenset(
    {CREATED, QUEUED, IN_PROGRESS, ITEM_ADDED, PART_ADDED, TEXT_DELTA, TEXT_DONE, PART_DONE, ITEM_DONE}
    | {COMPLETED, INCOMPLETE, FAILED, ERROR, ARGUMENTS_DELTA, ARGUMENTS_DONE}
)


def response_id(job_id: str) -> str:
    return RESPONSE_PREFIX + job_id.removeprefix(JOB_PREFIX)


def job_id(response_id: str) -> str | None:
    """The job behind a response id; None for a string that is not one."""
    if not response_id.startswith(RESPONSE_PREFIX) or len(response_id) > 64:
        return None
    rest = response_id.removeprefix(RESPONSE_PREFIX)
    return JOB_PREFIX + rest if rest.isalnum() else None


def message_id(job_id: str, index: int | None = None) -> str:
    """The output message of a response (index None), or its `index`-th input item."""
    base = MESSAGE_PREFIX + job_id.removeprefix(JOB_PREFIX)
    return base if index is None else f"{base}_in{index}"
