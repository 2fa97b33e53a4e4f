"""Running one job, whatever the engine: claim it, say it runs, arm its deadline, hand it to the engine
(engines.base) with what earlier attempts published, stream its events, write its result once; on a
worker stopping or an engine going away, hand it back to the queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from arq.worker import Retry
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import aio, logs
from shared.deadlines import ended
from shared.eventredis import EventsRedis
from shared.events import CHOICES, RESUME_FROM, RESUME_FROM_BY_CHOICE
from shared.states import FinishReason, JobStatus
from shared.webhooks import OUTPUT
from worker import metrics
from worker.engines.base import Engine, EngineUnavailable, Generation, GenerationJob
from worker.job_store import DB_DOWN, Claim, JobStore, Published
from worker.outputs import Outputs, top_logprobs
from worker.publisher import EventBatcher

log = logging.getLogger(__name__)

# How long a job handed back for EngineUnavailable waits in the queue before a worker takes it again.
ENGINE_RETRY_SECONDS = 2.0


def _ms(delta: Any) -> float:
    return float(delta.total_seconds() * 1000)


@dataclass(eq=False)
class _Run:
    job_id: str
    claim: Claim
    # What earlier attempts published, which this one continues (or, the engine unable to, only the
    # index its token events go on from).
    published: Published = field(default_factory=lambda: Published.nothing(1))
    generation: Generation | None = None  # its generation in the engine, once built
    cancelled: bool = False
    timed_out: bool = False  # its deadline passed while it ran
    hook_at: float = 0.0  # when its last `output` webhook was queued
    hook_task: asyncio.Task[None] | None = None
    t_start: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    peak_batch: int = 0

    @property
    def n(self) -> int:
        return len(self.published.texts)

    @property
    def stopped(self) -> bool:
        """Cancelled, or past its deadline: it ends now with its output so far."""
        return self.cancelled or self.timed_out

    @property
    def wants_output_hooks(self) -> bool:
        request = self.claim.request
        return bool(request.get("webhook")) and OUTPUT in (request.get("webhook_events_filter") or ())


class JobRunner:
    """Drives any engine through the engine contract; one per worker."""

    def __init__(
        self,
        *,
        engine: Engine,
        sessions: async_sessionmaker[AsyncSession],
        redis: Redis,
        events_redis: EventsRedis,
        events: EventBatcher,
        worker_id: str,
        default_max_tokens: int,
        model_name: str = "",
        output_webhook_seconds: float = 0.5,
    ) -> None:
        self.engine = engine
        self.store = JobStore(sessions, redis, events_redis, worker_id)
        self.events = events
        self.worker_id = worker_id
        self.default_max_tokens = default_max_tokens
        self.model_name = model_name
        self.output_webhook_seconds = output_webhook_seconds
        self.running: dict[str, _Run] = {}  # by job: its newest attempt on this worker
        self._runs: set[_Run] = set()  # every attempt running here (a frozen worker may hold two of a job)
        events.on_fenced = self._fenced

    async def run(self, job_id: str) -> str:
        logs.job_id.set(job_id)  # this task's log lines name the job (and, once claimed, its request)
        try:
            claim = await self.store.claim(job_id)
        except DB_DOWN as exc:
            log.warning("cannot claim job %s, Postgres is unreachable (%s); retrying in 1s", job_id, exc)
            raise Retry(defer=1) from None
        if claim is None:
            if await self._expire(job_id):
                return JobStatus.EXPIRED.value
            log.info("job %s is not queued any more; skipped", job_id)
            return "skipped"
        logs.request_id.set(claim.request_id)
        log.info(
            "job started (attempt %d, queued %.0f ms)",
            claim.attempt,
            _ms(claim.started_at - claim.created_at),
        )
        n = int(claim.request.get("n") or 1)
        published = Published.nothing(n)
        if claim.attempt > 1:
            published = await self._published(job_id, claim.request, n)
        run = _Run(job_id, claim, published)
        self.running[job_id] = run
        self._runs.add(run)
        metrics.queue_time.labels(self.model_name).observe(_ms(claim.started_at - claim.created_at) / 1000)
        metrics.running.labels(self.model_name).inc()
        status = {"status": "running", "worker_id": self.worker_id, "attempt": claim.attempt}
        status[RESUME_FROM] = len(published.texts[0])
        if n > 1:
            status[RESUME_FROM_BY_CHOICE] = [len(text) for text in published.texts]
        self.events.emit(job_id, "status", status, attempt=claim.attempt)
        timer = self._arm_deadline(run)
        try:
            return await self._generate(run)
        except asyncio.CancelledError:
            # The worker is shutting down: hand the job back to the queue for another worker. Bounded:
            # with Postgres away the reaper hands it back once this worker's heartbeat is gone.
            with contextlib.suppress(Exception):
                await asyncio.shield(aio.wait_for(self._requeue(run), 5))
            raise
        except EngineUnavailable as exc:
            log.warning("job %s goes back to the queue: %s", job_id, exc)
            await self._requeue(run, reason="engine_unavailable")
            raise Retry(defer=ENGINE_RETRY_SECONDS) from None
        except Exception as exc:
            log.exception("job %s failed", job_id)
            metrics.failures.labels(self.model_name, "engine_error").inc()
            await self._fail(run, "engine_error", str(exc) or type(exc).__name__)
            return "failed"
        finally:
            if timer is not None:
                timer.cancel()
            metrics.running.labels(self.model_name).dec()
            self._runs.discard(run)
            if self.running.get(job_id) is run:  # a newer attempt of it may run here now (see _fenced)
                del self.running[job_id]
            self._stop(run)

    async def _published(self, job_id: str, request: dict[str, Any], n: int) -> Published:
        """What this attempt continues: what earlier ones published, if the engine can continue it;
        else nothing, with token indexes going on from the last one (a client's Last-Event-ID stays
        valid, and the `running` status says `resume_from_chars: 0`)."""
        published = await self.store.published(job_id, n)
        if any(published.texts) and not self.engine.continues(request):
            log.info("job %s starts over: %s cannot continue its text", job_id, self.engine.name)
            return Published.nothing(n, published.next_index)
        return published

    async def _generate(self, run: _Run) -> str:
        request, claim = run.claim.request, run.claim
        job = GenerationJob(
            key=f"{run.job_id}#{claim.attempt}",
            request=request,
            n=run.n,
            max_tokens=int(request.get("max_tokens") or self.default_max_tokens),
            resumes=run.published.texts,
            prompt_tokens=claim.prompt_tokens,
        )
        generation = run.generation = self.engine.generation(job)
        outputs = Outputs(
            run.job_id,
            claim.attempt,
            run.published.texts,
            run.published.logprobs,
            next_index=run.published.next_index,
            logprobs=top_logprobs(request) is not None,
            events=self.events,
            model_name=self.model_name,
            on_text=lambda: self._output_webhook(run),
            started=run.t_start,
            queued_s=_ms(claim.started_at - claim.created_at) / 1000,
        )
        if run.timed_out:
            pass  # its deadline passed already
        elif await self.cancel_flagged(run.job_id):
            run.cancelled = True
        else:
            await generation.run(outputs)
        outcome = generation.outcome()
        if outcome.generated > outputs.counted:  # an engine that tells its count at the end
            metrics.generation_tokens.labels(self.model_name).inc(outcome.generated - outputs.counted)
        run.t_first, run.peak_batch = outputs.first_at, outputs.peak_batch
        reasons = [self._reason(run, reason) for reason in outcome.reasons]
        status = JobStatus.CANCELLED if run.stopped else JobStatus.SUCCEEDED
        record = outputs.record(reasons)
        return await self._complete(
            run, status, record, outcome.completion_tokens, reasons[0], outcome.prompt_tokens
        )

    @staticmethod
    def _reason(run: _Run, engine_reason: FinishReason) -> FinishReason:
        if run.cancelled:
            return FinishReason.CANCELLED
        if run.timed_out:
            return FinishReason.TIMEOUT
        return engine_reason

    def _arm_deadline(self, run: _Run) -> asyncio.TimerHandle | None:
        """Stop the job at its deadline (already passed: it stops before it generates anything)."""
        if run.claim.deadline_at is None:
            return None
        remaining = (run.claim.deadline_at - datetime.now(UTC)).total_seconds()
        if remaining <= 0:
            run.timed_out = True
            return None
        return asyncio.get_running_loop().call_later(remaining, self._time_out, run)

    def _time_out(self, run: _Run) -> None:
        log.info("job %s reached its deadline; stopping it", run.job_id)
        run.timed_out = True
        self._stop(run)

    def cancel(self, job_id: str) -> bool:
        """Stop a running job mid-generation; its tokens so far are kept."""
        run = self.running.get(job_id)
        if run is None:
            return False
        run.cancelled = True
        self._stop(run)
        return True

    def _fenced(self, job_id: str, attempt: int) -> None:
        """Redis dropped this attempt's events: a newer attempt runs the job (this worker was frozen long
        enough to lose it, and woke up) or it ended. Stop generating it; its final write will find the
        job moved on and drop the result."""
        for run in list(self._runs):
            if run.job_id == job_id and run.claim.attempt == attempt:
                run.cancelled = True
                self._stop(run)

    def _stop(self, run: _Run) -> None:
        """Make the engine stop the job's generation, if it still runs."""
        if run.generation is not None:
            run.generation.cancel()

    async def cancel_flagged(self, job_id: str) -> bool:
        return await self.store.cancel_flagged(job_id)

    def _output_webhook(self, run: _Run) -> None:
        """For a job whose webhook asked for `output`: one delivery queued every output_webhook_seconds
        at most, written beside the engine's path (a slow Postgres never holds the tokens up)."""
        if not run.wants_output_hooks:
            return
        now = time.monotonic()
        if now - run.hook_at < self.output_webhook_seconds or (run.hook_task and not run.hook_task.done()):
            return
        run.hook_at = now
        run.hook_task = asyncio.create_task(
            self.store.queue_output_hook(run.job_id, run.claim.tenant, run.claim.request["webhook"])
        )

    async def _expire(self, job_id: str) -> bool:
        """A job not claimed because its deadline passed before it started: it ends `expired` here."""
        row = await self.store.expire(job_id)
        if row is None:
            return False
        log.info("job expired: its deadline passed before it started")
        self.events.emit(job_id, "done", ended(row.prompt_tokens, 0, JobStatus.EXPIRED))
        await self.events.flush(job_id)
        return True

    async def _complete(
        self,
        run: _Run,
        status: JobStatus,
        record: dict[str, Any],
        completion: int,
        reason: FinishReason,
        prompt_tokens: int,
    ) -> str:
        """The result: its record written once (this attempt still owning the job), the key's quota
        counted, the metrics observed, and the `done` event."""
        now = time.monotonic()
        queue_ms = (run.claim.started_at - run.claim.created_at).total_seconds() * 1000
        running_s = now - run.t_start
        timings = {
            "queue_ms": round(queue_ms, 3),
            "ttft_ms": round(queue_ms + (run.t_first - run.t_start) * 1000, 3) if run.t_first else None,
            "total_ms": round(queue_ms + running_s * 1000, 3),
            "tokens_per_s": round(completion / running_s, 3) if running_s > 0 else None,
        }
        values = {
            **record,
            "finish_reason": reason.value,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "peak_batch_size": run.peak_batch or None,
            "finished_at": datetime.now(UTC),
            **timings,
        }
        if not await self._write_final(run, status, values):
            log.info("job %s attempt %d lost the race for its result; dropped", run.job_id, run.claim.attempt)
            return "superseded"
        await self._count_tokens(run, completion)
        self._observe(timings, prompt_tokens, completion, reason)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        done: dict[str, Any] = {"finish_reason": reason.value, "usage": usage, "timings": timings}
        choices = record.get("choices")
        if choices is not None:
            done[CHOICES] = [{"index": c["index"], "finish_reason": c["finish_reason"]} for c in choices]
        self.events.emit(run.job_id, "done", done, attempt=run.claim.attempt)
        await self.events.flush(run.job_id)
        return status.value

    def _observe(self, timings: dict[str, Any], prompt: int, completion: int, reason: FinishReason) -> None:
        name = self.model_name
        metrics.e2e.labels(name).observe(timings["total_ms"] / 1000)
        metrics.prompt_tokens.labels(name).inc(prompt)
        metrics.success.labels(name, reason.value).inc()
        log.info(
            "job ended: %s, %d tokens",
            reason.value,
            completion,
            extra={k: v for k, v in timings.items() if v is not None},
        )

    async def _count_tokens(self, run: _Run, tokens: int) -> None:
        """Add the job's tokens to its API key's daily quota counter (if the key has a quota)."""
        await self.store.count_tokens(run.job_id, run.claim.request.get("quota_key"), tokens)

    async def _write_final(self, run: _Run, status: JobStatus, values: dict[str, Any]) -> bool:
        return await self.store.write_final(run.job_id, run.claim.attempt, status, values)

    async def _fail(self, run: _Run, error_type: str, message: str) -> None:
        values = {
            "error_type": error_type,
            "error_message": message[:2000],
            "finished_at": datetime.now(UTC),
        }
        with contextlib.suppress(Exception):
            if await self._write_final(run, JobStatus.FAILED, values):
                error = {"type": error_type, "message": message[:2000]}
                self.events.emit(run.job_id, "error", error, attempt=run.claim.attempt)
                await self.events.flush(run.job_id)

    async def _requeue(self, run: _Run, reason: str = "worker_shutdown") -> None:
        try:
            if await self.store.requeue(run.job_id, run.claim.attempt):
                status = {"status": "queued", "reason": reason, "attempt": run.claim.attempt}
                # This attempt's late events are dropped from now on.
                self.events.emit(run.job_id, "status", status, attempt=run.claim.attempt + 1)
                await aio.wait_for(self.events.flush(run.job_id), 2)
        except Exception:
            log.exception("could not hand job %s back to the queue", run.job_id)
