"""The stream events of a response that may call functions, numbered by position in the model's text
(as api/openai/responses/events.py numbers a text answer's), so that a live stream and one rebuilt
from the Postgres record give every event the same `sequence_number`.

For an answer `content <tool_call>...</tool_call>...` (shared/tool_parsers.py), with T = 5 + its length:

    3, 4            the message item and its part are added (only when there is content)
    4 + e           a content delta that ends at character e
    4 + c + 1..3    the message's text, part and item done, c = where the first call marker starts
                    (T..T+2 when no call follows)
    4 + n           a function_call item added, n = where its name ends in the text
    4 + e           a delta of its arguments that ends at character e
    4 + a + 1, + 2  its arguments done and its item done, a = where its arguments end (the closing
                    `}\\n</tool_call>` leaves room); an item cut short by max_tokens is done at T
    T+3, T+4        error (failed only), and the response's last event, as for a text answer
"""

from __future__ import annotations

from typing import Any

from api.openai.responses.events import IN_PROGRESS, ResponseEvents, _end_type, after
from api.openai.responses.render import function_call, item_status, message, output_part, ran, render
from shared import responses as wire
from shared.events import Event, text_after
from shared.models import Job
from shared.states import JobStatus
from shared.tool_parsers import call_spans, item_id
from shared.tools import calls_allowed

_BASE = 4


class CallResponseEvents(ResponseEvents):
    """Turns the events of a response job whose answer may hold calls into its stream events."""

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.last = -1  # the number of the last event given

    def _start(self) -> list[dict[str, Any]]:
        self.started = True
        in_progress = render(self.job, "in_progress")
        return [{"type": wire.IN_PROGRESS, "sequence_number": IN_PROGRESS, "response": in_progress}]

    def _fresh(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = list(after(events, self.last if self.last >= 0 else None))
        if out:
            self.last = max(self.last, out[-1]["sequence_number"])
        return out

    def feed(self, event: Event) -> list[dict[str, Any]]:
        self.text = text_after(self.text, event)
        running = event.event == "status" and event.data.get("status") == JobStatus.RUNNING.value
        out = self._start() if (running or event.event == "token") and not self.started else []
        if out:
            self.last = max(self.last, out[-1]["sequence_number"])
        if event.event == "token":
            out += self._fresh(derive(self.job, self.text, None))
        return out

    def closing(self, job: Job) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if ran(job) and not self.started:
            out += self._start()
            self.last = max(self.last, out[-1]["sequence_number"])
        text = job.output or ""
        if self.started:
            out += self._fresh(derive(job, text, job))
        end = 1 + _BASE + len(text)
        final = render(job)
        if job.status == JobStatus.FAILED.value:
            error = final["error"]
            out.append(
                {
                    "type": wire.ERROR,
                    "sequence_number": end + 3,
                    "code": error["code"],
                    "message": error["message"],
                    "param": None,
                }
            )
        out.append({"type": _end_type(job), "sequence_number": end + 4, "response": final})
        return out


def events_for(job: Job) -> ResponseEvents:
    """The derivation of a response's stream events: by text, or, for one whose answer may hold calls,
    by position in its text."""
    return CallResponseEvents(job) if calls_allowed(job.request) else ResponseEvents(job)


def derive(job: Job, text: str, final: Job | None) -> list[dict[str, Any]]:
    """Every item event of the answer `text` (so far, or `final`'s), numbered by position."""
    content_end, spans = call_spans(text)
    if final is not None and not spans:
        content_end = len(text)
    content = text[:content_end]
    end = 1 + _BASE + len(text)
    events: list[dict[str, Any]] = []
    has_message = bool(content.strip())
    if has_message:
        msg_id = wire.message_id(job.id)
        location = {"output_index": 0, "content_index": 0}
        events += [
            {
                "type": wire.ITEM_ADDED,
                "sequence_number": 3,
                "output_index": 0,
                "item": message(job, None, "in_progress"),
            },
            {
                "type": wire.PART_ADDED,
                "sequence_number": 4,
                "item_id": msg_id,
                **location,
                "part": output_part(""),
            },
            {
                "type": wire.TEXT_DELTA,
                "sequence_number": _BASE + len(content),
                "item_id": msg_id,
                **location,
                "delta": content,
                "logprobs": [],
            },
        ]
        if spans or final is not None:
            at = _BASE + content_end + 1 if spans else end
            status = "completed" if spans or final is None else item_status(final)
            done = message(job, content, status)
            events += [
                {
                    "type": wire.TEXT_DONE,
                    "sequence_number": at,
                    "item_id": msg_id,
                    **location,
                    "text": content,
                    "logprobs": [],
                },
                {
                    "type": wire.PART_DONE,
                    "sequence_number": at + 1,
                    "item_id": msg_id,
                    **location,
                    "part": done["content"][0],
                },
                {"type": wire.ITEM_DONE, "sequence_number": at + 2, "output_index": 0, "item": done},
            ]
    first = 1 if has_message else 0
    for i, span in enumerate(spans):
        if span.name is None or span.name_end is None:
            break
        index = first + i
        fc_id = item_id(job.id, i)
        events.append(
            {
                "type": wire.ITEM_ADDED,
                "sequence_number": _BASE + span.name_end,
                "output_index": index,
                "item": function_call(job, i, span.name, "", "in_progress"),
            }
        )
        if span.arguments_start is None:
            break
        stop = span.arguments_end if span.arguments_end is not None else len(text)
        arguments = text[span.arguments_start : stop]
        if arguments:
            events.append(
                {
                    "type": wire.ARGUMENTS_DELTA,
                    "sequence_number": _BASE + stop,
                    "item_id": fc_id,
                    "output_index": index,
                    "delta": arguments,
                }
            )
        if span.arguments_end is not None and span.end is not None:
            events += [
                {
                    "type": wire.ARGUMENTS_DONE,
                    "sequence_number": _BASE + stop + 1,
                    "item_id": fc_id,
                    "output_index": index,
                    "name": span.name,
                    "arguments": arguments,
                },
                {
                    "type": wire.ITEM_DONE,
                    "sequence_number": _BASE + stop + 2,
                    "output_index": index,
                    "item": function_call(job, i, span.name, arguments, "completed"),
                },
            ]
        elif final is not None:  # cut short by max_tokens
            item = function_call(job, i, span.name, arguments, "incomplete")
            events.append(
                {"type": wire.ITEM_DONE, "sequence_number": end, "output_index": index, "item": item}
            )
    return events
