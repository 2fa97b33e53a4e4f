"""The batch manager (a duty: one API process at a time) moves every batch through its states.

Each tick it validates new batches (creating one queued job per good line, enqueued later), marks
batches past their window as expired, cancels what cancelled or expired batches still have queued
or running, tops the batch queue up from the oldest batch first (so a 10,000-line batch costs Redis a
few hundred entries at a time, never 10,000 writes at once), and writes the output and error files
of every batch whose jobs have all finished. Every step is a guarded UPDATE, safe to repeat.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import undefer

from api.batches.records import job_counts, rejected_line, result_line
from api.batches.validation import parse_batch_file
from api.http.services import Services
from api.jobs.cancellation import signal_cancel
from api.jobs.enqueue import enqueue
from api.jobs.published import end_waiting_retry
from api.tenancy.auth import Principal
from shared.models import ApiKey, Batch, File, Job
from shared.states import BATCH_TERMINAL, BatchStatus, FinishReason, JobStatus
from shared.transitions import move

log = logging.getLogger(__name__)

_KIND = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
_ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()


class BatchManager:
    name = "batches"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings.batches
        self.interval = self.settings.tick_seconds
        self._signalled: set[str] = set()  # batches whose running jobs this process has told to stop

    async def tick(self) -> None:
        if not await self._any_open():
            return  # the usual case: one indexed look instead of five statements, 4 times a second
        await self._validate_next()
        await self._expire()
        await self._cancel()
        await self._feed()
        await self._finalize()

    async def _any_open(self) -> bool:
        open_ = [s.value for s in BatchStatus if s not in BATCH_TERMINAL]
        async with self.services.sessions() as session:
            found = await session.scalar(select(Batch.id).where(Batch.status.in_(open_)).limit(1))
        return found is not None

    # validating -> in_progress | failed ------------------------------------------------------------

    async def _validate_next(self) -> None:
        async with self.services.sessions() as session:
            batch = (
                (
                    await session.execute(
                        select(Batch)
                        .where(Batch.status == BatchStatus.VALIDATING.value)
                        .order_by(Batch.created_at)
                    )
                )
                .scalars()
                .first()
            )
            if batch is None:
                return
            content = await session.scalar(select(File.content).where(File.id == batch.input_file_id))
            quota = None
            if batch.api_key_id is not None:
                quota = await session.scalar(
                    select(ApiKey.tokens_per_day).where(ApiKey.id == batch.api_key_id)
                )
        principal = Principal(batch.tenant, batch.api_key_id, tokens_per_day=quota)
        parsed = await parse_batch_file(self.services, content or b"", batch.endpoint, principal)
        guard = (Batch.id == batch.id, Batch.status == BatchStatus.VALIDATING.value)
        async with self.services.sessions() as session, session.begin():
            if parsed.errors:
                await session.execute(
                    update(Batch)
                    .where(*guard)
                    .values(
                        status=BatchStatus.FAILED.value,
                        failed_at=func.now(),
                        errors=[e.model_dump() for e in parsed.errors],
                    )
                )
                log.info("batch %s failed validation (%d errors)", batch.id, len(parsed.errors))
                return
            started = await session.execute(
                update(Batch)
                .where(*guard)
                .values(
                    status=BatchStatus.IN_PROGRESS.value,
                    in_progress_at=func.now(),
                    total=parsed.total,
                    rejected=parsed.rejected or None,
                    model=parsed.jobs[0].model if parsed.jobs else None,
                )
            )
            if not getattr(started, "rowcount", 0):
                return  # cancelled while it was being read
            for job in parsed.jobs:
                job.batch_id = batch.id
            session.add_all(parsed.jobs)
        log.info(
            "batch %s in progress: %d jobs, %d refused", batch.id, len(parsed.jobs), len(parsed.rejected)
        )

    # expiry and cancellation -------------------------------------------------------------------------

    async def _expire(self) -> None:
        stmt = (
            update(Batch)
            .where(
                Batch.status.in_([BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]),
                Batch.expires_at < func.now(),
                Batch.expired_at.is_(None),
            )
            .values(
                expired_at=func.now(),
                # A batch never validated has no jobs to wind down: straight to finishing.
                status=func.coalesce(
                    func.nullif(Batch.status, BatchStatus.VALIDATING.value), BatchStatus.CANCELLING.value
                ),
            )
            .returning(Batch.id)
        )
        async with self.services.sessions() as session, session.begin():
            for batch_id in (await session.execute(stmt)).scalars():
                log.info("batch %s expired", batch_id)

    async def _cancel(self) -> None:
        async with self.services.sessions() as session, session.begin():
            batch_ids = list(
                (
                    await session.execute(
                        select(Batch.id).where(
                            or_(
                                Batch.status == BatchStatus.CANCELLING.value,
                                (Batch.status == BatchStatus.IN_PROGRESS.value)
                                & Batch.expired_at.isnot(None),
                            )
                        )
                    )
                ).scalars()
            )
            if not batch_ids:
                return
            # Jobs that never ran, all at once; those waiting to be retried keep their text (below).
            dropped = (
                await session.execute(
                    move(
                        JobStatus.CANCELLED,
                        Job.batch_id.in_(batch_ids),
                        Job.attempts == 0,
                        src=JobStatus.QUEUED,
                        finish_reason=FinishReason.CANCELLED.value,
                        output="",
                        completion_tokens=0,
                        finished_at=func.clock_timestamp(),
                    ).returning(Job.id, Job.model)
                )
            ).all()
            retried = (
                await session.execute(
                    select(Job.id, Job.model, Job.attempts, Job.request, Job.prompt_tokens).where(
                        Job.batch_id.in_(batch_ids), Job.status == JobStatus.QUEUED.value, Job.attempts > 0
                    )
                )
            ).all()
            to_signal = [b for b in batch_ids if b not in self._signalled]
            running: list[str] = []
            if to_signal:
                running = list(
                    (
                        await session.execute(
                            select(Job.id).where(
                                Job.batch_id.in_(to_signal), Job.status == JobStatus.RUNNING.value
                            )
                        )
                    ).scalars()
                )
        if dropped:
            async with self.services.redis.pipeline(transaction=False) as pipe:
                for job_id, model in dropped:
                    pipe.zrem(self.services.settings.queues.for_model(model, batch=True), job_id)
                await pipe.execute()
        for row in retried:
            queue = self.services.settings.queues.for_model(row.model, batch=True)
            if not await end_waiting_retry(self.services, row, FinishReason.CANCELLED, queue):
                running.append(row.id)  # a worker took it meanwhile: stopped there instead
        if running:
            await signal_cancel(self.services, running)
        self._signalled.update(to_signal)

    # feeding the batch queue -------------------------------------------------------------------------

    async def _feed(self) -> None:
        queues = self.services.settings.queues
        async with self.services.sessions() as session:
            batches = list(
                (
                    await session.execute(
                        select(Batch.id, Batch.fed)
                        .where(Batch.status == BatchStatus.IN_PROGRESS.value, Batch.expired_at.is_(None))
                        .order_by(Batch.created_at, Batch.id)
                    )
                ).all()
            )
            if not batches:
                return
            # arq keeps a running job in its queue until it ends: those are not waiting.
            running = await session.scalar(
                select(func.count()).where(Job.status == JobStatus.RUNNING.value, Job.batch_id.isnot(None))
            )
        async with self.services.redis.pipeline(transaction=False) as pipe:
            for model in self.services.models:
                pipe.zcard(queues.for_model(model, batch=True))
            queued = sum(await pipe.execute())
        room = self.settings.queue_target - (queued - int(running or 0))
        for batch_id, fed in batches:
            if room <= 0:
                return
            async with self.services.sessions() as session:
                rows = (
                    await session.execute(
                        select(Job.id, Job.model, Job.batch_line, Job.tenant)
                        .where(
                            Job.batch_id == batch_id,
                            Job.batch_line > fed,
                            Job.status == JobStatus.QUEUED.value,
                        )
                        .order_by(Job.batch_line)
                        .limit(room)
                    )
                ).all()
            if not rows:
                continue
            for job_id, model, _, tenant in rows:
                await enqueue(self.services.redis, queues.for_model(model, batch=True), job_id, tenant)
            async with self.services.sessions() as session, session.begin():
                await session.execute(
                    update(Batch).where(Batch.id == batch_id).values(fed=rows[-1].batch_line)
                )
            room -= len(rows)

    # in_progress | cancelling -> finalizing -> completed | cancelled | expired -----------------------

    async def _finalize(self) -> None:
        async with self.services.sessions() as session:
            candidates = list(
                (
                    await session.execute(
                        select(Batch.id).where(
                            Batch.status.in_([BatchStatus.IN_PROGRESS.value, BatchStatus.CANCELLING.value])
                        )
                    )
                ).scalars()
            )
            counts = await job_counts(session, candidates)
        for batch_id in candidates:
            if not any(counts.get(batch_id, {}).get(s, 0) for s in _ACTIVE):
                await self._write_results(batch_id)

    async def _write_results(self, batch_id: str) -> None:
        async with self.services.sessions() as session, session.begin():
            batch = (
                await session.execute(
                    update(Batch)
                    .where(
                        Batch.id == batch_id,
                        Batch.status.in_([BatchStatus.IN_PROGRESS.value, BatchStatus.CANCELLING.value]),
                    )
                    .values(status=BatchStatus.FINALIZING.value, finalizing_at=func.now())
                    .returning(Batch)
                )
            ).scalar_one_or_none()
        if batch is None:
            return
        kind = _KIND[batch.endpoint]
        expired = batch.expired_at is not None
        query = select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_line)
        if kind == "embeddings":
            query = query.options(undefer(Job.embedding))  # the vectors, left out of other reads
        async with self.services.sessions() as session:
            jobs = (await session.execute(query)).scalars()
            results = [(job.batch_line or 0, *result_line(job, kind, expired)) for job in jobs]
        rejected = [(entry["line"], False, rejected_line(entry)) for entry in batch.rejected or []]
        ordered = sorted(results + rejected, key=lambda r: r[0])
        output = [line for _, ok, line in ordered if ok]
        errors = [line for _, ok, line in ordered if not ok]
        final: dict[str, Any]
        if expired:
            final = {"status": BatchStatus.EXPIRED.value}
        elif batch.cancelling_at is not None:
            final = {"status": BatchStatus.CANCELLED.value, "cancelled_at": func.now()}
        else:
            final = {"status": BatchStatus.COMPLETED.value, "completed_at": func.now()}
        async with self.services.sessions() as session, session.begin():
            files: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
            for column, lines, suffix in (
                ("output_file_id", output, "output"),
                ("error_file_id", errors, "errors"),
            ):
                if lines:
                    content = _jsonl(lines)
                    file = File(
                        tenant=batch.tenant,
                        purpose="batch_output",
                        filename=f"{batch_id}_{suffix}.jsonl",
                        size=len(content),
                        lines=len(lines),
                        content=content,
                    )
                    session.add(file)
                    await session.flush()
                    files[column] = file.id
            await session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status == BatchStatus.FINALIZING.value)
                .values(**final, **files)
            )
        self._signalled.discard(batch_id)
        log.info("batch %s %s: %d results, %d errors", batch_id, final["status"], len(output), len(errors))
