"""Running an embeddings job: the JobRunner's claim, deadlines, cancel and one guarded final write, with
the embedding engine in place of generation. The vectors go to `jobs.embedding` (shared/embeddings.py);
the `done` event carries the usage, and the input tokens count against the key's daily quota.

An embedding job is over in a few milliseconds of model time, so its two Postgres writes (the claim and
the result) would cost more than its forward pass: concurrent jobs share them (shared/grouped.py),
one UPDATE claiming every job that arrived meanwhile, one writing every result ready meanwhile (and one
Redis pipeline reading their cancel flags)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from shared import keys
from shared.grouped import Grouped
from shared.models import Job
from shared.states import FinishReason, JobStatus
from shared.transitions import move_each
from worker import metrics
from worker.embedder import Embedder
from worker.job_store import DB_DOWN, WRITE_BACKOFF_MAX_SECONDS, Claim, JobStore, claim_statement
from worker.jobs import JobRunner, _Run

log = logging.getLogger(__name__)

# Tokenizing is CPU work on the worker's event loop: a large request goes to a thread.
_TOKENIZE_IN_THREAD_CHARS = 20_000


# The session holds no Job objects to keep in step with an UPDATE: skip the ORM's evaluation of it.
_NO_SYNC = {"synchronize_session": False}


@dataclass
class _Write:
    job_id: str
    attempt: int
    status: JobStatus
    values: dict[str, Any]


class GroupedJobStore(JobStore):
    """JobStore whose claims, cancel-flag reads and result writes of concurrent jobs go together."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store.sessions, store.redis, store.events_redis, store.worker_id)
        self._claims: Grouped[str, Claim | None] = Grouped(self._claim_many)
        self._writes: Grouped[_Write, bool] = Grouped(self._write_many)
        self._flags: Grouped[str, bool] = Grouped(self._flagged_many)

    async def claim(self, job_id: str) -> Claim | None:
        return await self._claims(job_id)

    async def cancel_flagged(self, job_id: str) -> bool:
        return await self._flags(job_id)

    async def write_final(self, job_id: str, attempt: int, status: JobStatus, values: dict[str, Any]) -> bool:
        return await self._writes(_Write(job_id, attempt, status, values))

    async def _flagged_many(self, job_ids: list[str]) -> list[bool]:
        """JobStore.cancel_flagged for many jobs in one pipeline (one round trip per shard)."""
        try:
            async with self.events_redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.exists(keys.cancel_flag(job_id))
                return [bool(n) for n in await pipe.execute()]
        except RedisError as exc:
            log.warning("cannot read %d jobs' cancel flags (%s); starting them", len(job_ids), exc)
            return [False] * len(job_ids)

    async def _claim_many(self, job_ids: list[str]) -> list[Claim | None]:
        """JobStore.claim for many jobs in one UPDATE: queued -> running unless its deadline passed
        before it started; the running-time bound joins the deadline (LEAST keeps the earlier)."""
        stmt = claim_statement(Job.id.in_(job_ids), self.worker_id)
        async with self.sessions() as session, session.begin():
            rows = {row.id: row for row in await session.execute(stmt, execution_options=_NO_SYNC)}
        return [Claim.of(rows[job_id]) if job_id in rows else None for job_id in job_ids]

    async def _write_many(self, writes: list[_Write]) -> list[bool]:
        """JobStore.write_final for many jobs: one UPDATE per kind of write (status and columns), all in
        one transaction, each guarded by its job's attempt; retried while Postgres is away."""
        kinds: dict[tuple[JobStatus, tuple[str, ...]], list[_Write]] = {}
        for w in writes:
            kinds.setdefault((w.status, tuple(w.values)), []).append(w)
        statements = [
            move_each(
                status,
                [{"id": w.job_id, "attempts": w.attempt, **w.values} for w in group],
                match=("id", "attempts"),
                src=JobStatus.RUNNING,
            ).returning(Job.id)
            for (status, _), group in kinds.items()
        ]
        delay = 0.25
        while True:
            try:
                written: set[str] = set()
                async with self.sessions() as session, session.begin():
                    for stmt in statements:
                        result = await session.execute(stmt, execution_options=_NO_SYNC)
                        written.update(job_id for (job_id,) in result)
                return [w.job_id in written for w in writes]
            except DB_DOWN as exc:
                log.warning(
                    "results of %d jobs not written, Postgres unreachable (%s); retrying", len(writes), exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_BACKOFF_MAX_SECONDS)


class EmbeddingRunner(JobRunner):
    def __init__(self, *, embedder: Embedder, **kwargs: Any) -> None:
        super().__init__(engine=embedder, **kwargs)  # type: ignore[arg-type]
        self.embedder = embedder
        self.store = GroupedJobStore(self.store)

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
