"""A response's stream events, derived from its job's events, numbered so that any API process,
live or from the Postgres record alone, gives every event the same `sequence_number`.

The numbers follow the text, not the job's event seqs (a job's record keeps its output, not how it
was split into events):

    0 response.created      1 response.queued (background only)      2 response.in_progress
    3 response.output_item.added                4 response.content_part.added
    4 + e   response.output_text.delta whose text ends at character e of the output (e >= 1)
    T = 5 + len(output):  T output_text.done, T+1 content_part.done, T+2 output_item.done,
    T+3 error (failed only), T+4 response.completed | incomplete | failed (a cancelled response ends
    with response.incomplete whose status is "cancelled")

So `starting_after=N` means "I have the text up to character N - 4": a resume from the record sends
that text's remainder as one delta, numbered as the live deltas end. A job tried again after losing
its worker continues from the text it had published (worker/jobs.py), so its deltas carry on where
they stopped: never repeated, never contradicted, and the stream stays `in_progress` throughout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from api.openai.responses.render import message, output_part, ran, render, status
from shared import responses as wire
from shared.events import Event, text_after
from shared.models import Job
from shared.states import JobStatus

CREATED, QUEUED, IN_PROGRESS, ITEM_ADDED, PART_ADDED = range(5)
_TEXT_BASE = 4  # a delta ending at character e is numbered 4 + e
_LOCATION = {"output_index": 0, "content_index": 0}


def _end_type(job: Job) -> str:
    state = status(job)
    if state == "completed":
        return wire.COMPLETED
    if state == "failed":
        return wire.FAILED
    return wire.INCOMPLETE  # max_output_tokens, or cancelled


class ResponseEvents:
    """Turns one response job's events, in order, into its stream events."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.item_id = wire.message_id(job.id)
        self.started = False
        self.sent = ""  # text the deltas carried
        self.text = ""  # the job's text so far (shared/events.py: text_after)

    def opening(self) -> list[dict[str, Any]]:
        events = [{"type": wire.CREATED, "sequence_number": CREATED, "response": render(self.job, "created")}]
        if render(self.job, "created")["background"]:
            events.append(
                {"type": wire.QUEUED, "sequence_number": QUEUED, "response": render(self.job, "created")}
            )
        return events

    def _start(self) -> list[dict[str, Any]]:
        self.started = True
        return [
            {
                "type": wire.IN_PROGRESS,
                "sequence_number": IN_PROGRESS,
                "response": render(self.job, "in_progress"),
            },
            {
                "type": wire.ITEM_ADDED,
                "sequence_number": ITEM_ADDED,
                "output_index": 0,
                "item": message(self.job, None, "in_progress"),
            },
            {
                "type": wire.PART_ADDED,
                "sequence_number": PART_ADDED,
                "item_id": self.item_id,
                **_LOCATION,
                "part": output_part(""),
            },
        ]

    def _delta(self, text: str) -> dict[str, Any]:
        self.sent += text
        return {
            "type": wire.TEXT_DELTA,
            "sequence_number": _TEXT_BASE + len(self.sent),
            "item_id": self.item_id,
            **_LOCATION,
            "delta": text,
            "logprobs": [],
        }

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The stream events one job event makes (none for an end event: see `closing`)."""
        self.text = text_after(self.text, event)
        running = event.event == "status" and event.data.get("status") == JobStatus.RUNNING.value
        events = self._start() if (running or event.event == "token") and not self.started else []
        if event.event == "token" and len(self.text) > len(self.sent):
            events.append(self._delta(self.text[len(self.sent) :]))
        return events

    def closing(self, job: Job) -> list[dict[str, Any]]:
        """The events that end the stream, from the job's final record."""
        events: list[dict[str, Any]] = []
        text = job.output or ""
        if ran(job) and not self.started:
            events += self._start()
        if self.started and len(text) > len(self.sent) and text.startswith(self.sent):
            events.append(self._delta(text[len(self.sent) :]))
        end = 1 + _TEXT_BASE + max(len(text), len(self.sent))
        final = render(job)
        if self.started:
            item = final["output"][0] if final["output"] else message(job, text, "incomplete")
            part = item["content"][0]
            events += [
                {
                    "type": wire.TEXT_DONE,
                    "sequence_number": end,
                    "item_id": self.item_id,
                    **_LOCATION,
                    "text": part["text"],
                    "logprobs": [],
                },
                {
                    "type": wire.PART_DONE,
                    "sequence_number": end + 1,
                    "item_id": self.item_id,
                    **_LOCATION,
                    "part": part,
                },
                {"type": wire.ITEM_DONE, "sequence_number": end + 2, "output_index": 0, "item": item},
            ]
        if job.status == JobStatus.FAILED.value:
            error = final["error"]
            events.append(
                {
                    "type": wire.ERROR,
                    "sequence_number": end + 3,
                    "code": error["code"],
                    "message": error["message"],
                    "param": None,
                }
            )
        events.append({"type": _end_type(job), "sequence_number": end + 4, "response": final})
        return events


def finished(derive: ResponseEvents, job_events: list[Event]) -> list[dict[str, Any]]:
    """Every stream event of a finished response: from its job's events while Redis has them (the
    deltas as they were streamed), else from its Postgres record alone (the text as one delta)."""
    job = derive.job
    events = derive.opening()
    if any(e.is_end for e in job_events):
        for event in job_events:
            if not event.is_end:
                events += derive.feed(event)
    return events + derive.closing(job)


def last_number(job: Job) -> int:
    """The sequence_number of a finished response's last event."""
    return 1 + _TEXT_BASE + len(job.output or "") + 4


def after(events: Iterable[dict[str, Any]], starting_after: int | None) -> Iterator[dict[str, Any]]:
    """The events past `starting_after`; a delta that straddles it is cut to the text not yet had."""
    for event in events:
        number = event["sequence_number"]
        if starting_after is None or number > starting_after:
            if (
                event["type"] in (wire.TEXT_DELTA, wire.ARGUMENTS_DELTA)
                and starting_after is not None
                and starting_after > _TEXT_BASE
            ):
                start = number - len(event["delta"]) - _TEXT_BASE
                had = starting_after - _TEXT_BASE
                if start < had:
                    event = {**event, "delta": event["delta"][had - start :]}
            yield event
