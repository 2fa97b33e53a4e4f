"""Running an embeddings job: the JobRunner's claim, deadlines, cancel and one guarded final write, with
the embedding engine in place of generation. The vectors go to `jobs.embedding` (shared/embeddings.py);
the `done` event carries the usage, and the input tokens count against the key's daily quota."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from shared.states import FinishReason, JobStatus
from worker import metrics
from worker.embedder import Embedder
from worker.jobs import JobRunner, _Run

# Tokenizing is CPU work on the worker's event loop: a large request goes to a thread.
_TOKENIZE_IN_THREAD_CHARS = 20_000


class EmbeddingRunner(JobRunner):
    def __init__(self, *, embedder: Embedder, **kwargs: Any) -> None:
        super().__init__(engine=embedder, **kwargs)  # type: ignore[arg-type]
        self.embedder = embedder

    def _rows(self, inputs: list[Any]) -> list[list[int]]:
        return [self.embedder.token_ids(item, index) for index, item in enumerate(inputs)]

    async def _generate(self, run: _Run) -> str:
        request = run.claim.request
        inputs: list[Any] = list(request.get("input") or [])
        if await self.cancel_flagged(run.job_id):
            run.cancelled = True
        blob: bytes | None = None
        tokens = 0
        if not run.stopped:
            if sum(len(i) for i in inputs) > _TOKENIZE_IN_THREAD_CHARS:
                rows = await asyncio.to_thread(self._rows, inputs)
            else:
                rows = self._rows(inputs)
            tokens = sum(len(r) for r in rows)
            vectors = await self.embedder.embed(rows)
            run.t_first = time.monotonic()
            run.peak_batch = max(run.peak_batch, self.embedder.stats.last_batch_size)
            shortened = self.embedder.shorten(vectors, request.get("dimensions"))
            blob = np.ascontiguousarray(shortened, dtype="<f4").tobytes()
        if run.cancelled:
            reason = FinishReason.CANCELLED
        elif run.timed_out:
            reason = FinishReason.TIMEOUT
        else:
            reason = FinishReason.STOP
        status = JobStatus.CANCELLED if run.stopped else JobStatus.SUCCEEDED
        return await self._finish(run, status, reason, None if run.stopped else blob, tokens)

    async def _finish(
        self, run: _Run, status: JobStatus, reason: FinishReason, blob: bytes | None, tokens: int
    ) -> str:
        queue_ms = (run.claim.started_at - run.claim.created_at).total_seconds() * 1000
        running_s = time.monotonic() - run.t_start
        prompt = tokens or int(run.claim.prompt_tokens or 0)
        timings = {
            "queue_ms": round(queue_ms, 3),
            "ttft_ms": None,
            "total_ms": round(queue_ms + running_s * 1000, 3),
            "tokens_per_s": None,  # nothing is generated
        }
        values = {
            "embedding": blob,
            "finish_reason": reason.value,
            "prompt_tokens": prompt,
            "completion_tokens": 0,
            "peak_batch_size": run.peak_batch or None,
            "finished_at": datetime.now(UTC),
            **timings,
        }
        if not await self._write_final(run, status, values):
            return "superseded"
        if blob is not None:
            await self._count_tokens(run, prompt)  # an embedding's cost is its input
        name = self.model_name
        metrics.e2e.labels(name).observe(queue_ms / 1000 + running_s)
        metrics.prompt_tokens.labels(name).inc(prompt if blob is not None else 0)
        metrics.success.labels(name, reason.value).inc()
        usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
        self.events.emit(
            run.job_id,
            "done",
            {"finish_reason": reason.value, "usage": usage, "timings": timings},
            attempt=run.claim.attempt,
        )
        await self.events.flush(run.job_id)
        return status.value
