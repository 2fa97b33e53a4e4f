"""A job's outputs as an engine generates them: the token events (their indexes, each output's `choice`,
the logprobs of the tokens each carries), the generation metrics, and, at the end, the output, logprobs
and choices of the job's record. The engine-neutral side of engines.base.TokenSink."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.events import CHOICE
from shared.logprobs import LOGPROBS
from shared.states import FinishReason
from worker import metrics
from worker.publisher import EventBatcher


def top_logprobs(request: Any) -> int | None:
    """How many alternatives per token a job asked for; None: no logprobs."""
    return int(request.get("top_logprobs") or 0) if request.get("logprobs") else None


@dataclass
class _Choice:
    index: int
    resume: str  # the text earlier attempts published, which this one continues
    logprobs: list[dict[str, Any]]  # of its published tokens
    new: list[str] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)  # logprobs of tokens not yet in an event
    last_token_at: float = 0.0

    @property
    def text(self) -> str:
        return self.resume + "".join(self.new)


class Outputs:
    """The runner's TokenSink for one job."""

    def __init__(
        self,
        job_id: str,
        attempt: int,
        resumes: Sequence[str],
        resume_logprobs: Sequence[list[dict[str, Any]]],
        *,
        next_index: int,
        logprobs: bool,
        events: EventBatcher,
        model_name: str,
        on_text: Callable[[], None],
        started: float,
        queued_s: float,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        pairs = zip(resumes, resume_logprobs, strict=True)
        self.choices = [_Choice(i, resume, list(lp)) for i, (resume, lp) in enumerate(pairs)]
        self.next_index = next_index  # of the next token event: every output's events count together
        self.asked = logprobs
        self.events = events
        self.on_text = on_text
        self.started = started
        self.queued_s = queued_s
        self.first_at: float | None = None  # when the first token came
        self.peak_batch = 0
        self.counted = 0  # tokens counted into the metrics as they came
        self._generated = metrics.generation_tokens.labels(model_name)
        self._itl = metrics.itl.labels(model_name)
        self._ttft = metrics.ttft.labels(model_name)

    def tokens(
        self, choice: int, text: str, logprobs: list[dict[str, Any]] | None, count: int, batch_size: int = 0
    ) -> None:
        out = self.choices[choice]
        if count:
            # Counted as the engine makes them, so that a rate of this counter is live (not a lump at
            # each job's end) and counts what a failed or lost job generated too.
            self._generated.inc(count)
            self.counted += count
            now = time.monotonic()
            if self.first_at is None:
                self.first_at = now
                self._ttft.observe(self.queued_s + now - self.started)
            elif out.last_token_at:
                for _ in range(count):
                    self._itl.observe((now - out.last_token_at) / count)
            out.last_token_at = now
        self.peak_batch = max(self.peak_batch, batch_size)
        if logprobs:
            out.pending += logprobs
        if text:
            self._emit(out, text)
            self.on_text()

    def end(self, choice: int, text: str = "") -> None:
        out = self.choices[choice]
        if text or out.pending:
            self._emit(out, text)

    def _emit(self, out: _Choice, text: str) -> None:
        """One token event of an output: its text and (when asked) the logprobs of the tokens it carries,
        and of those held back before it."""
        event: dict[str, Any] = {"index": self.next_index, "text": text}
        if len(self.choices) > 1:
            event[CHOICE] = out.index
        if self.asked:
            event[LOGPROBS] = out.pending
        self.events.emit(self.job_id, "token", event, attempt=self.attempt)
        self.next_index += 1
        out.new.append(text)
        out.logprobs += out.pending
        out.pending = []

    def record(self, reasons: Sequence[FinishReason]) -> dict[str, Any]:
        """The record's output, logprobs and choices (n > 1: each output by its index)."""
        first = self.choices[0]
        choices = None
        if len(self.choices) > 1:
            choices = [
                {
                    "index": o.index,
                    "text": o.text,
                    "finish_reason": reason.value,
                    **({"logprobs": o.logprobs} if self.asked else {}),
                }
                for o, reason in zip(self.choices, reasons, strict=True)
            ]
        return {"output": first.text, "logprobs": first.logprobs if self.asked else None, "choices": choices}
