"""What a job stopped outside its worker keeps: the text its token events carried, per output.

A cancel of a job waiting to be retried, a deadline that passes while it waits, the reaper's cancel of
a job whose worker died: each ends a job that may have published text already (clients have it), so
its stored output, choices and logprobs are rebuilt from its events, the way its worker would have
stored them, and its `done` event says what the worker's would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func

from api.http.services import Services
from api.jobs.enqueue import forget
from shared.events import CHOICES, logprobs_of, read_events, text_of
from shared.models import Job
from shared.states import FinishReason, JobStatus
from shared.transitions import move


@dataclass(frozen=True)
class Published:
    texts: list[str]  # per output
    logprobs: list[list[dict[str, Any]]] | None  # per output, when the job asked for them
    completion_tokens: int
    reason: FinishReason

    def values(self) -> dict[str, Any]:
        """The job's columns, as the worker's final write sets them."""
        choices = None
        if len(self.texts) > 1:
            choices = [
                {
                    "index": i,
                    "text": text,
                    "finish_reason": self.reason.value,
                    **({"logprobs": self.logprobs[i]} if self.logprobs is not None else {}),
                }
                for i, text in enumerate(self.texts)
            ]
        return {
            "finish_reason": self.reason.value,
            "output": self.texts[0],
            "logprobs": self.logprobs[0] if self.logprobs is not None else None,
            "choices": choices,
            "completion_tokens": self.completion_tokens,
        }

    def done(self, prompt_tokens: int | None, **extra: Any) -> dict[str, Any]:
        """The job's `done` event."""
        prompt = prompt_tokens or 0
        event: dict[str, Any] = {
            "finish_reason": self.reason.value,
            **extra,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens,
            },
            "timings": {},
        }
        if len(self.texts) > 1:
            reason = self.reason.value
            event[CHOICES] = [{"index": i, "finish_reason": reason} for i in range(len(self.texts))]
        return event


async def published(
    services: Services,
    job_id: str,
    *,
    request: dict[str, Any],
    model: str,
    attempts: int,
    reason: FinishReason,
) -> Published:
    """What the job's events carried so far (nothing, for one that never started: its attempts are 0)."""
    n = int(request.get("n") or 1)
    events = await read_events(services.events_redis, job_id) if attempts else []
    texts = [text_of(events, i) for i in range(n)]
    logprobs = [logprobs_of(events, i) for i in range(n)] if request.get("logprobs") else None
    info = services.models.get(model)
    # Counted as the worker counts the text a retried attempt continues from: its tokens re-encoded.
    tokens = sum(len(info.tokenizer.encode(t, add_special_tokens=False)) for t in texts if t) if info else 0
    return Published(texts, logprobs, tokens, reason)


async def end_waiting_retry(services: Services, row: Any, reason: FinishReason, queue: str) -> bool:
    """A job that waits in `queue` to be tried again (it lost a worker) ends `cancelled` with the text
    it published, as its worker would have ended it (a cancel of its batch, or its deadline: `reason`).
    False when it no longer waits (a worker took it meanwhile). `row`: its id, attempts, model, request
    and prompt_tokens."""
    kept = await published(
        services, row.id, request=dict(row.request), model=row.model, attempts=row.attempts, reason=reason
    )
    stmt = move(
        JobStatus.CANCELLED,
        Job.id == row.id,
        Job.attempts == row.attempts,
        src=JobStatus.QUEUED,
        finished_at=func.clock_timestamp(),
        **kept.values(),
    )
    async with services.sessions() as session, session.begin():
        result = await session.execute(stmt)
    if not getattr(result, "rowcount", 0):
        return False
    await forget(services.redis, row.id, queue)
    await services.events.publish(
        row.id, "done", kept.done(row.prompt_tokens, status=JobStatus.CANCELLED.value)
    )
    return True
