"""Running one job: claim it in Postgres, feed it to the engine, stream its events, write its result once."""

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
from redis.exceptions import RedisError
from sqlalchemy import Interval, func, literal_column, or_
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import aio, keys, logs, tools
from shared.deadlines import ended, expire_unstarted
from shared.eventredis import EventsRedis
from shared.events import (
    CHOICE,
    CHOICES,
    RESUME_FROM,
    RESUME_FROM_BY_CHOICE,
    logprobs_of,
    read_events,
    text_of,
)
from shared.logprobs import LOGPROBS
from shared.models import Job
from shared.prompts import prompt_token_ids
from shared.states import FinishReason, JobStatus
from shared.tool_parsers import parser_for
from shared.transitions import move
from shared.webhooks import OUTPUT, queue_output_delivery
from worker import metrics
from worker.detok import IncrementalDecoder, TokenTexts
from worker.engine import Engine, RequestHandle, SamplingOptions
from worker.publisher import EventBatcher
from worker.sampling import TokenLogprob

log = logging.getLogger(__name__)


def _ms(delta: Any) -> float:
    return float(delta.total_seconds() * 1000)


# Postgres being unreachable: the worker waits for it rather than lose a result.
DB_DOWN = (OperationalError, DBAPIError, OSError)
WRITE_BACKOFF_MAX_SECONDS = 5.0


class EngineUnavailable(Exception):
    """The engine went away under a running job and is coming back (a supervised server restarting):
    the job goes back to the queue, to continue from its published text, instead of failing."""


# How long a job handed back for EngineUnavailable waits in the queue before a worker takes it again.
ENGINE_RETRY_SECONDS = 2.0


@dataclass
class _Claim:
    request: dict[str, Any]
    attempt: int
    created_at: datetime
    started_at: datetime
    request_id: str | None
    prompt_tokens: int | None = None
    deadline_at: datetime | None = None
    tenant: str | None = None


@dataclass
class _Output:
    """One of a job's n outputs as it is generated."""

    index: int
    resume: str  # the text an earlier attempt published for it
    resumed: list[int]  # those tokens, which count as generated
    max_tokens: int
    options: SamplingOptions
    decoder: IncrementalDecoder
    logprobs: list[dict[str, Any]]  # of its published tokens
    pending: list[dict[str, Any]] = field(default_factory=list)  # of tokens whose text is held back
    handle: RequestHandle | None = None

    @property
    def text(self) -> str:
        return self.resume + self.decoder.text


@dataclass(eq=False)
class _Run:
    job_id: str
    claim: _Claim
    n: int = 1  # outputs asked for
    # The text each output's earlier attempts published, which this one continues, and its logprobs.
    resumes: list[str] = field(default_factory=lambda: [""])
    resume_logprobs: list[list[dict[str, Any]]] = field(default_factory=lambda: [[]])
    next_index: int = 0  # index of the next token event
    handles: list[RequestHandle] = field(default_factory=list)  # its requests in the engine
    cancelled: bool = False
    timed_out: bool = False  # its deadline passed while it ran
    hook_at: float = 0.0  # when its last `output` webhook was queued
    hook_task: asyncio.Task[None] | None = None

    @property
    def stopped(self) -> bool:
        """Cancelled, or past its deadline: it ends now with its output so far."""
        return self.cancelled or self.timed_out

    @property
    def wants_output_hooks(self) -> bool:
        request = self.claim.request
        return bool(request.get("webhook")) and OUTPUT in (request.get("webhook_events_filter") or ())

    t_start: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    peak_batch: int = 0


class JobRunner:
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
        self.sessions = sessions
        self.redis = redis  # the queue's: quota counters
        self.events_redis = events_redis  # job events and cancel flags (the cluster, when there is one)
        self.events = events
        self.worker_id = worker_id
        self.default_max_tokens = default_max_tokens
        self.model_name = model_name
        self.output_webhook_seconds = output_webhook_seconds
        self.running: dict[str, _Run] = {}  # by job: its newest attempt on this worker
        self._runs: set[_Run] = set()  # every attempt running here (a frozen worker may hold two of a job)
        self._token_texts: TokenTexts | None = None
        events.on_fenced = self._fenced

    def _logprob_dicts(self, entries: list[TokenLogprob], eos: set[int]) -> list[dict[str, Any]]:
        """The sampler's entries as shared.logprobs.TokenLogprob dicts; the end-of-sequence token that
        ends a generation is not one of the answer's tokens (nor at OpenAI)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.engine.tokenizer)
        texts = self._token_texts
        out = []
        for entry in entries:
            if entry.token in eos:
                continue
            token, raw = texts(entry.token)
            top = []
            for alt, logprob in entry.top:
                alt_token, alt_raw = texts(alt)
                top.append({"token": alt_token, "logprob": logprob, "bytes": alt_raw})
            out.append({"token": token, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top})
        return out

    def _eos_ids(self) -> set[int]:
        eos = self.engine.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    async def run(self, job_id: str) -> str:
        logs.job_id.set(job_id)  # this task's log lines name the job (and, once claimed, its request)
        try:
            claim = await self._claim(job_id)
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
        run = _Run(job_id, claim, n=n, resumes=[""] * n, resume_logprobs=[[] for _ in range(n)])
        if claim.attempt > 1:
            run.resumes, run.next_index, run.resume_logprobs = await self._published(job_id, n)
        self.running[job_id] = run
        self._runs.add(run)
        metrics.queue_time.labels(self.model_name).observe(_ms(claim.started_at - claim.created_at) / 1000)
        metrics.running.labels(self.model_name).inc()
        status = {"status": "running", "worker_id": self.worker_id, "attempt": claim.attempt}
        status[RESUME_FROM] = len(run.resumes[0])
        if n > 1:
            status[RESUME_FROM_BY_CHOICE] = [len(text) for text in run.resumes]
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

    def _output_webhook(self, run: _Run) -> None:
        """For a job whose webhook asked for `output`: one delivery queued every output_webhook_seconds
        at most, written beside the engine's path (a slow Postgres never holds the tokens up)."""
        if not run.wants_output_hooks:
            return
        now = time.monotonic()
        if now - run.hook_at < self.output_webhook_seconds or (run.hook_task and not run.hook_task.done()):
            return
        run.hook_at = now
        run.hook_task = asyncio.create_task(self._queue_output_hook(run))

    async def _queue_output_hook(self, run: _Run) -> None:
        params = {
            "job": run.job_id,
            "tenant": run.claim.tenant or "default",
            "url": run.claim.request["webhook"],
        }
        try:
            async with self.sessions() as session, session.begin():
                await session.execute(queue_output_delivery(), params)
        except Exception as exc:  # an output event is best effort: the completed one is the promise
            log.warning("job %s: output webhook not queued (%s)", run.job_id, exc)

    async def _expire(self, job_id: str) -> bool:
        """A job not claimed because its deadline passed before it started: it ends `expired` here."""
        try:
            async with self.sessions() as session, session.begin():
                row = (await session.execute(expire_unstarted(job_id))).one_or_none()
        except DB_DOWN:
            return False  # the API's deadline duty ends it
        if row is None:
            return False
        log.info("job expired: its deadline passed before it started")
        self.events.emit(job_id, "done", ended(row.prompt_tokens, 0, JobStatus.EXPIRED))
        await self.events.flush(job_id)
        return True

    async def cancel_flagged(self, job_id: str) -> bool:
        """Whether a cancel was asked before this worker claimed the job. The job's shard being away
        (restarting, failing over) does not stop the job from starting: a cancel asked now still comes
        as a message on the queue's Redis."""
        try:
            return bool(await self.events_redis.exists(keys.cancel_flag(job_id)))
        except RedisError as exc:
            log.warning("job %s: cannot read its cancel flag (%s); starting it", job_id, exc)
            return False

    async def _published(self, job_id: str, n: int) -> tuple[list[str], int, list[list[dict[str, Any]]]]:
        """The text earlier attempts of a job published (this attempt continues it rather than start
        over, so that what clients already have stays true), the next token event's index, and the
        logprobs of that text's tokens (for a job that asked for them)."""
        try:
            events = await read_events(self.events_redis, job_id)
        except Exception as exc:
            log.warning("job %s: cannot read the text it had so far (%s); starting over", job_id, exc)
            return [""] * n, 0, [[] for _ in range(n)]
        indexes = [int(e.data.get("index", 0)) for e in events if e.event == "token"]
        texts = [text_of(events, i) for i in range(n)]
        if any(texts):
            chars = sum(len(t) for t in texts)
            log.info("job %s continues from the %d characters it had published", job_id, chars)
        return texts, max(indexes, default=-1) + 1, [logprobs_of(events, i) for i in range(n)]

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
        """Make the engine drop the job's request, if it still runs."""
        for handle in run.handles:
            if not handle.closed:
                self.engine.cancel(handle.request_id)

    async def _claim(self, job_id: str) -> _Claim | None:
        """Queued -> running, unless its deadline passed before it ever started. The running-time bound
        joins the deadline here: LEAST keeps the earlier, so a retried job keeps its first one."""
        second = literal_column("interval '1 second'", Interval)
        stmt = move(
            JobStatus.RUNNING,
            Job.id == job_id,
            or_(Job.deadline_at.is_(None), Job.attempts > 0, Job.deadline_at > func.clock_timestamp()),
            src=JobStatus.QUEUED,
            attempts=Job.attempts + 1,
            worker_id=self.worker_id,
            started_at=func.clock_timestamp(),
            deadline_at=func.least(Job.deadline_at, func.clock_timestamp() + Job.timeout_seconds * second),
        ).returning(
            Job.request,
            Job.attempts,
            Job.created_at,
            Job.started_at,
            Job.request_id,
            Job.prompt_tokens,
            Job.deadline_at,
            Job.tenant,
        )
        async with self.sessions() as session, session.begin():
            row = (await session.execute(stmt)).one_or_none()
        if row is None:
            return None
        return _Claim(
            dict(row.request),
            int(row.attempts),
            row.created_at,
            row.started_at,
            row.request_id,
            row.prompt_tokens,
            row.deadline_at,
            row.tenant,
        )

    async def _generate(self, run: _Run) -> str:
        request = run.claim.request
        input_ids = prompt_token_ids(self.engine.tokenizer, request)
        max_tokens = int(request.get("max_tokens") or self.default_max_tokens)
        outputs = [self._output(run, i, max_tokens) for i in range(run.n)]
        if run.timed_out:
            pass  # its deadline passed already
        elif await self.cancel_flagged(run.job_id):
            run.cancelled = True
        else:
            # The outputs after the first start once its prompt is in the engine's cache, whose full
            # pages they then share (prefix sharing) instead of computing the prompt n times; a prompt
            # shorter than a page has none to share, so they start with it.
            prefilled = asyncio.Event()
            share = len(input_ids) >= self.engine.settings.page_size
            tasks = [
                asyncio.create_task(
                    self._decode(run, out, input_ids, prefilled, wait=share and out.index > 0)
                )
                for out in outputs
            ]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # One output failed (or the worker stops): the others end now, before the job's end.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        reasons = [self._finish_reason(run, out) for out in outputs]
        first = outputs[0]
        status = JobStatus.CANCELLED if run.stopped else JobStatus.SUCCEEDED
        completion = sum(len(o.resumed) + len(o.decoder.token_ids) for o in outputs)
        asked = first.options.top_logprobs is not None
        choices = None
        if run.n > 1:
            choices = [
                {
                    "index": o.index,
                    "text": o.text,
                    "finish_reason": reason.value,
                    **({"logprobs": o.logprobs} if asked else {}),
                }
                for o, reason in zip(outputs, reasons, strict=True)
            ]
        return await self._complete(
            run,
            status,
            first.text,
            completion,
            reasons[0],
            len(input_ids),
            first.logprobs if asked else None,
            choices,
        )

    def _output(self, run: _Run, index: int, max_tokens: int) -> _Output:
        request = run.claim.request
        tokenizer = self.engine.tokenizer
        resume = run.resumes[index]
        # A retried job continues after the text it had: those tokens count as generated already.
        resumed = list(tokenizer.encode(resume, add_special_tokens=False)) if resume else []
        seed = request.get("seed")
        if seed is not None and index:
            seed = (int(seed) + index) % 2**63  # n outputs of one seed: n different, reproducible texts
        options = SamplingOptions(
            max_tokens=max(1, max_tokens - len(resumed)),
            temperature=float(request.get("temperature", 1.0)),
            top_p=float(request.get("top_p", 1.0)),
            top_k=request.get("top_k"),
            response_format=request.get("response_format"),
            tool_grammar=tools.request_grammar(request),
            grammar_prefix=tuple(resumed),
            seed=seed,
            top_logprobs=int(request.get("top_logprobs") or 0) if request.get("logprobs") else None,
        )
        decoder = IncrementalDecoder(tokenizer, request.get("stop"), context=resumed)
        return _Output(index, resume, resumed, max_tokens, options, decoder, list(run.resume_logprobs[index]))

    async def _decode(
        self, run: _Run, out: _Output, input_ids: list[int], prefilled: asyncio.Event, *, wait: bool
    ) -> None:
        """Run one output in the engine and publish its tokens; `prefilled` is set once the first output
        has its first token (or ended), which is when the others start if `wait`."""
        try:
            if len(out.resumed) >= out.max_tokens:
                return  # max_tokens used up by the text it continues from
            if wait:
                await prefilled.wait()
            if run.stopped:
                return
            suffix = f"/{out.index}" if run.n > 1 else ""
            out.handle = self.engine.submit(
                f"{run.job_id}#{run.claim.attempt}{suffix}", input_ids + out.resumed, out.options
            )
            run.handles.append(out.handle)
            await self._stream(run, out, out.handle, prefilled)
        finally:
            prefilled.set()
        tail = out.decoder.finish()
        if tail or out.pending:
            self._emit_token(run, out, tail)

    async def _stream(self, run: _Run, out: _Output, handle: RequestHandle, prefilled: asyncio.Event) -> None:
        decoder, eos = out.decoder, self._eos_ids()
        itl = metrics.itl.labels(self.model_name)
        # Counted as the engine makes them, so that a rate of this counter is live (not a lump at
        # each job's end) and counts what a failed or lost job generated too.
        generated = metrics.generation_tokens.labels(self.model_name)
        last_token_at = 0.0
        while not run.stopped:
            update_ = await handle.next()
            if out.index == 0:
                prefilled.set()
            if update_.error:
                raise RuntimeError(update_.error)
            if update_.new_tokens:
                generated.inc(len(update_.new_tokens))
                now = time.monotonic()
                if run.t_first is None:
                    run.t_first = now
                    queued = _ms(run.claim.started_at - run.claim.created_at) / 1000
                    metrics.ttft.labels(self.model_name).observe(queued + now - run.t_start)
                elif last_token_at:
                    for _ in update_.new_tokens:
                        itl.observe((now - last_token_at) / len(update_.new_tokens))
                last_token_at = now
            run.peak_batch = max(run.peak_batch, update_.batch_size)
            consumed = len(decoder.token_ids)
            text = decoder.push(update_.new_tokens)
            if update_.logprobs is not None:
                # The decoder takes tokens from the front and stops at a stop string: its share.
                consumed = len(decoder.token_ids) - consumed
                out.pending += self._logprob_dicts(update_.logprobs[:consumed], eos)
            if text:
                self._emit_token(run, out, text)
                self._output_webhook(run)
            if decoder.stopped:
                self.engine.cancel(handle.request_id)
                break
            if update_.finished:
                break

    def _emit_token(self, run: _Run, out: _Output, text: str) -> None:
        """One token event of an output: its text and (when asked) the logprobs of the tokens it carries,
        and of those held back before it; its index counts every output's events together."""
        event: dict[str, Any] = {"index": run.next_index, "text": text}
        if run.n > 1:
            event[CHOICE] = out.index
        if out.options.top_logprobs is not None:
            event[LOGPROBS] = out.pending
        self.events.emit(run.job_id, "token", event, attempt=run.claim.attempt)
        run.next_index += 1
        out.logprobs += out.pending
        out.pending = []

    def _finish_reason(self, run: _Run, out: _Output) -> FinishReason:
        decoder = out.decoder
        if run.cancelled:
            return FinishReason.CANCELLED
        if run.timed_out:
            return FinishReason.TIMEOUT
        if out.handle is None and out.resumed:  # the text it continues from had used up max_tokens
            return FinishReason.LENGTH
        if decoder.stopped:
            return self._stopped(run, out)
        if decoder.token_ids and decoder.token_ids[-1] in self._eos_ids():
            return self._stopped(run, out)
        if len(decoder.token_ids) >= out.options.max_tokens:
            return FinishReason.LENGTH
        return self._stopped(run, out)

    def _stopped(self, run: _Run, out: _Output) -> FinishReason:
        """An answer that ended by itself: `tool_calls` when it made calls (as OpenAI says it)."""
        if tools.calls_allowed(run.claim.request):
            if parser_for(self.engine.tokenizer.chat_template).extract(out.text).calls:
                return FinishReason.TOOL_CALLS
        return FinishReason.STOP

    async def _complete(
        self,
        run: _Run,
        status: JobStatus,
        output: str,
        completion: int,
        reason: FinishReason,
        prompt_tokens: int,
        logprobs: list[dict[str, Any]] | None = None,
        choices: list[dict[str, Any]] | None = None,
    ) -> str:
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
            "output": output,
            "logprobs": logprobs,
            "choices": choices,
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
        """Add the job's generated tokens to its API key's daily quota counter (if the key has a quota)."""
        quota_key = run.claim.request.get("quota_key")
        if not quota_key or not tokens:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incrby(quota_key, tokens)
                pipe.expire(quota_key, 2 * 86_400)
                await pipe.execute()
        except Exception as exc:
            log.warning("job %s: could not count %d tokens against its quota: %s", run.job_id, tokens, exc)

    async def _write_final(self, run: _Run, status: JobStatus, values: dict[str, Any]) -> bool:
        """The one result write: only the attempt that still owns the running job may make it.
        While Postgres is unreachable it is retried with backoff, for as long as it takes."""
        stmt = move(
            status, Job.id == run.job_id, Job.attempts == run.claim.attempt, src=JobStatus.RUNNING, **values
        )
        delay = 0.25
        while True:
            try:
                async with self.sessions() as session, session.begin():
                    result = await session.execute(stmt)
                return bool(getattr(result, "rowcount", 0))
            except DB_DOWN as exc:
                log.warning(
                    "result of job %s not written, Postgres unreachable (%s); retrying", run.job_id, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_BACKOFF_MAX_SECONDS)

    async def _fail(self, run: _Run, error_type: str, message: str) -> None:
        values = {
            "error_type": error_type,
            "error_message": message[:2000],
            "finished_at": datetime.now(UTC),
        }
        with contextlib.suppress(Exception):
            if await self._write_final(run, JobStatus.FAILED, values):
                self.events.emit(
                    run.job_id,
                    "error",
                    {"type": error_type, "message": message[:2000]},
                    attempt=run.claim.attempt,
                )
                await self.events.flush(run.job_id)

    async def _requeue(self, run: _Run, reason: str = "worker_shutdown") -> None:
        stmt = move(
            JobStatus.QUEUED,
            Job.id == run.job_id,
            Job.attempts == run.claim.attempt,
            src=JobStatus.RUNNING,
            worker_id=None,
        )
        try:
            async with self.sessions() as session, session.begin():
                result = await session.execute(stmt)
            if getattr(result, "rowcount", 0):
                self.events.emit(
                    run.job_id,
                    "status",
                    {
                        "status": "queued",
                        "reason": reason,
                        "attempt": run.claim.attempt,
                    },
                    attempt=run.claim.attempt + 1,  # this attempt's late events are dropped from now on
                )
                await aio.wait_for(self.events.flush(run.job_id), 2)
        except Exception:
            log.exception("could not hand job %s back to the queue", run.job_id)
