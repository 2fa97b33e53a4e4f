"""arq worker wiring: every resource is built in on_startup and closed in on_shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable
from signal import Signals
from typing import Any

import uvloop
from arq.connections import RedisSettings
from arq.worker import Function, Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import aio, keys, logs
from shared.db import check_schema, create_engine, session_factory
from shared.embeddings import EmbeddingModelError
from shared.eventredis import check_queue_redis, connect_events
from shared.events import EventWriter
from shared.runtime import freeze_startup_objects
from shared.settings import Settings
from worker import metrics
from worker.cpu_threads import govern
from worker.embedder import Embedder, embedding_spec, start_embedder
from worker.embedding_jobs import EmbeddingRunner
from worker.engines.base import Engine
from worker.engines.http import HttpEngine
from worker.engines.openai_http import OpenAIHttpEngine
from worker.engines.sidecar import SidecarNotUp, wait_until_up
from worker.engines.transformers import TransformersEngine
from worker.engines.vllm import VllmEngine
from worker.engines.vllm_embedder import start_vllm_embedder
from worker.engines.vllm_server import VllmError, VllmServer, dtype_args
from worker.jobs import JobRunner
from worker.model import in_daemon_thread, load_model
from worker.publisher import EventBatcher
from worker.queue_claims import ClaimingWorker
from worker.registry import Heartbeat

log = logging.getLogger(__name__)
# Idle threads of the event loop's default executor: they end at interpreter exit on their own.
_POOL_THREADS = ("uvloop_", "asyncio_", "ThreadPoolExecutor")


async def run_job(ctx: dict[str, Any], job_id: str) -> str:
    runner: JobRunner = ctx["runner"]
    try:
        return await runner.run(job_id)
    finally:
        ctx["wake"].set()  # a slot is free: poll for queued jobs now


async def _listen(redis: Redis, runner: JobRunner, wake: asyncio.Event, queues: list[str]) -> None:
    """One pub/sub connection per worker: a cancel for a job held here stops it in the engine, and an
    enqueue on one of this worker's queues wakes its poll loop."""
    wake_channels = {keys.wake_channel(q).encode() for q in queues}
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.CANCEL_CHANNEL, *wake_channels)
            wake.set()  # anything enqueued while not subscribed is found by this poll
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                if message["channel"] in wake_channels:
                    wake.set()
                    continue
                job_id = message["data"].decode()
                if runner.cancel(job_id):
                    log.info("job %s cancelled mid-generation", job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("pub/sub listener lost Redis (%s); reconnecting", exc)
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _http_engine(settings: Settings) -> HttpEngine:
    w = settings.worker
    model = w.upstream_model or settings.served_model_name
    if w.engine == "openai-http":
        return OpenAIHttpEngine(
            w.upstream_url or "", w.upstream_api_key, w.job_timeout, model, w.upstream_capabilities
        )
    if w.upstream_url:  # a vLLM someone else runs (or a sidecar: upstream_sidecar)
        return VllmEngine(w.upstream_url, w.upstream_api_key, w.job_timeout, model)
    server = VllmServer(
        model_dir=str(settings.require_model_dir()),
        served_name=model,
        data_dir=settings.data_dir,
        device=settings.model.device,
        port=w.vllm_port,
        args=[*dtype_args(settings.model, w.vllm_args), *w.vllm_args],
        start_seconds=w.vllm_start_seconds,
    )
    return VllmEngine(server.url, None, w.job_timeout, model, server)


async def _start_engine(ctx: dict[str, Any], settings: Settings, upstream: bool) -> Engine | Embedder:
    w = settings.worker
    if w.engine == "vllm" and not w.upstream_url and (spec := embedding_spec(settings.require_model_dir())):
        return await start_vllm_embedder(ctx, settings, spec)  # an embedding model on vLLM's pooling
    if upstream:
        http = _http_engine(settings)
        ctx["engine"] = http  # from here on, a stop at any moment stops its server too
        http.start()
        if settings.worker.upstream_sidecar and settings.worker.upstream_url:
            # Its platform restarts it: a stream it loses hands the job back rather than failing it.
            http.supervised = True
            await wait_until_up(http, settings.worker.vllm_start_seconds)
        await http.warmup()  # fails start-up if the server is not there (its own: starts it first)
        log.info("engine %s: forwarding jobs to %s", http.name, http.base_url)
        return http
    spec = embedding_spec(settings.require_model_dir())
    if spec is not None:  # a sentence-transformers directory: an embedding worker
        return await start_embedder(ctx, settings, settings.require_model_dir(), spec)
    t0 = time.monotonic()
    log.info("loading model %s on %s", settings.model_path, settings.model.device)
    model, tokenizer = await in_daemon_thread(load_model, settings.require_model_dir(), settings.model)
    log.info(
        "model %s loaded on %s in %.2fs", settings.model_path, settings.model.device, time.monotonic() - t0
    )
    govern(model, settings.model.threads, metrics.cpu_threads.labels(settings.served_model_name).set)
    engine = TransformersEngine(model, tokenizer, settings.model)
    ctx["engine"] = engine  # from here on, a stop at any moment stops the engine's thread too
    engine.start()
    log.info("engine started; warming up")
    await engine.warmup()
    engine.step_observer = metrics.batch_size.labels(settings.served_model_name).observe
    return engine


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    redis: Redis = ctx["redis"]
    upstream = settings.worker.engine in ("openai-http", "vllm")
    db = create_engine(settings.require_urls()[1], pool_size=4)
    ctx["db"] = db
    # The schema check (Postgres round trips, reading the migration scripts) runs while the model loads.
    schema = asyncio.create_task(check_schema(db), name="inferq-check-schema")
    # Retrieved even when the engine's start fails first, so it is never reported as unhandled.
    schema.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        engine = await _start_engine(ctx, settings, upstream)
        await schema
    finally:
        schema.cancel()
    await check_queue_redis(redis)
    events_redis, owned = await connect_events(
        settings.events.redis_url or settings.require_urls()[0],
        settings.events.cluster,
        None if settings.events.redis_url else redis,
    )
    if owned:
        ctx["events_redis"] = events_redis
    batcher = EventBatcher(
        EventWriter(
            events_redis, maxlen=settings.events.stream_maxlen, ttl_seconds=settings.events.ttl_seconds
        ),
        coalesce_seconds=settings.events.coalesce_ms / 1000,
    )
    batcher.start()
    ctx["batcher"] = batcher
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{settings.model.device}"
    logs.worker_id.set(worker_id)  # inherited by every job task started after this
    common: dict[str, Any] = {
        "sessions": session_factory(db),
        "redis": redis,
        "events_redis": events_redis,
        "events": batcher,
        "worker_id": worker_id,
        "default_max_tokens": settings.limits.default_max_tokens,
        "model_name": settings.served_model_name,
        "output_webhook_seconds": settings.webhooks.output_seconds,
    }
    runner: JobRunner
    if isinstance(engine, Embedder):  # in process or on vLLM (VllmEmbedder)
        runner = EmbeddingRunner(embedder=engine, **common)
    else:
        runner = JobRunner(engine=engine, **common)  # any engine of the contract (engines.base)
    metrics.serve(settings.worker.metrics_port, settings.worker.metrics_host, settings.metrics_token)
    heartbeat = Heartbeat(redis, worker_id, settings, engine, runner)
    ctx["heartbeat"] = heartbeat
    await heartbeat.beat()
    heartbeat.start()
    freeze_startup_objects()
    ctx.update(engine=engine, db=db, batcher=batcher, runner=runner, worker_id=worker_id, heartbeat=heartbeat)
    queues = [settings.queues.for_model(settings.served_model_name)]
    queues.append(settings.queues.for_model(settings.served_model_name, batch=True))
    ctx["listener"] = asyncio.create_task(_listen(redis, runner, ctx["wake"], queues))
    log.info(
        "worker %s ready: model %s, capacity %d",
        worker_id,
        settings.served_model_name,
        settings.model.max_batch,
    )


async def _bounded(what: str, step: Awaitable[Any], seconds: float) -> None:
    """One shutdown step, given at most `seconds`: Redis or Postgres being away never stops a stop."""
    try:
        await aio.wait_for(step, seconds)
    except Exception as exc:
        log.warning("shutdown: %s did not finish (%s)", what, type(exc).__name__)


async def shutdown(ctx: dict[str, Any]) -> None:
    task = ctx.get("listener")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if "heartbeat" in ctx:
        await _bounded("removing the registry entry", ctx["heartbeat"].stop(), 3)
    if "batcher" in ctx:
        await _bounded("publishing the last events", ctx["batcher"].stop(), 3)
    if "events_redis" in ctx:
        await _bounded("closing the events Redis", ctx["events_redis"].aclose(), 2)
    if "engine" in ctx:
        await _bounded("stopping the engine", asyncio.to_thread(ctx["engine"].stop), 15)
        if not isinstance(ctx["engine"], Embedder):
            await _bounded("closing the engine's connections", ctx["engine"].aclose(), 3)
    if "db" in ctx:
        await _bounded("closing the database pool", ctx["db"].dispose(), 3)


class InferqWorker(ClaimingWorker):
    """arq's worker with two lanes and faster polling.

    The interactive queue is this worker's own; batch jobs come from a second arq Worker (the batch
    lane) that shares its Redis pool, context and job function. The lane takes a batch job only when
    the interactive lane has free slots left after its poll (so no interactive job is waiting) and
    leaves `interactive_reserve` engine slots free, so an interactive job arriving while a batch runs
    joins the engine at its next step instead of waiting for batch jobs to finish.

    Between polls it waits for a reason to poll: an enqueue on one of its queues (the API publishes
    on the queue's wake channel), one of its jobs ending (a free slot), or `poll_fallback` seconds
    (a missed notification, a deferred retry). Idle, it polls at most every `poll_delay`; while the
    engine is busy at most every `busy_poll_delay`, where each poll would only take CPU from the model
    and an engine step is far longer anyway.
    """

    busy_poll_delay: float = 0.05
    poll_fallback: float = 1.0
    batch_queue: str | None = None
    batch_capacity: int = 0
    batch_lane: Worker | None = None

    def _lane(self) -> Worker:
        if self.batch_lane is None:
            assert self.batch_queue is not None
            self.batch_lane = ClaimingWorker(
                functions=[f for f in self.functions.values() if isinstance(f, Function)],
                queue_name=self.batch_queue,
                redis_pool=self.pool,
                max_jobs=max(self.batch_capacity, 1),
                job_timeout=self.job_timeout_s,
                keep_result=0,
                ctx=self.ctx,
                handle_signals=False,
                health_check_interval=self.health_check_interval,
            )
        return self.batch_lane

    @property
    def wake(self) -> asyncio.Event:
        event: asyncio.Event = self.ctx["wake"]
        return event

    async def _poll_iteration(self) -> None:
        self.wake.clear()  # before the poll: a wake-up during it means poll again
        try:
            await self._poll_lanes()
        except (RedisError, OSError) as exc:
            # Redis is away: the engine keeps generating what it holds; polling resumes when it is back.
            log.warning("queue poll failed (%s); retrying in 1s", exc)
            await asyncio.sleep(1.0)
        if self.job_counter > 0 or (self.batch_lane is not None and self.batch_lane.job_counter > 0):
            await asyncio.sleep(self.busy_poll_delay)
        with contextlib.suppress(TimeoutError):
            await aio.wait_for(self.wake.wait(), self.poll_fallback)

    async def _poll_lanes(self) -> None:
        await super()._poll_iteration()
        if self.batch_queue is not None and self.batch_capacity > 0:
            lane = self._lane()
            room = self.batch_capacity - lane.job_counter - self.job_counter
            # With free interactive slots after the poll, no interactive job is waiting for this worker.
            lane.allow_pick_jobs = self.allow_pick_jobs and room > 0 and self.job_counter < self.max_jobs
            if lane.allow_pick_jobs:
                lane.max_jobs = lane.job_counter + room
            await lane._poll_iteration()

    def _held(self) -> list[asyncio.Task[Any]]:
        lanes: list[Worker] = [self] + ([self.batch_lane] if self.batch_lane is not None else [])
        return [t for lane in lanes for t in lane.tasks.values() if not t.done()]

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        """Drain: take no new job, let the held ones finish until the deadline, then hand the rest back."""
        if not self.allow_pick_jobs:
            log.info("second %s: stopping now", Signals(signum).name)
            self.handle_sig(signum)
            return
        self.allow_pick_jobs = False
        if self.batch_lane is not None:
            self.batch_lane.allow_pick_jobs = False
        heartbeat: Heartbeat | None = self.ctx.get("heartbeat")
        if heartbeat is not None:
            heartbeat.draining = True
        log.info(
            "%s: draining %d job(s) for up to %.0fs",
            Signals(signum).name,
            len(self._held()),
            self._job_completion_wait,
        )
        self.loop.create_task(self._drain(signum))

    async def _drain(self, signum: Signals) -> None:
        deadline = self.loop.time() + self._job_completion_wait
        while self._held() and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        left = len(self._held())
        if left:
            log.info("drain deadline reached: %d job(s) go back to the queue", left)
        self.handle_sig(signum)

    def handle_sig(self, signum: Signals) -> None:
        if self.batch_lane is not None:
            self.batch_lane.allow_pick_jobs = False
            for task in self.batch_lane.tasks.values():
                if not task.done():
                    task.cancel()  # the job runner hands the job back to the batch queue
        super().handle_sig(signum)

    async def close(self) -> None:
        """arq's close, except that an unreachable Redis does not skip `on_shutdown` (which stops the
        engine's thread: skipped, the process would never exit)."""
        if self.batch_lane is not None:
            await asyncio.gather(*self.batch_lane.tasks.values(), return_exceptions=True)
        if self._pool is None:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await _bounded("removing the health-check key", self.pool.delete(self.health_check_key), 2)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await _bounded("closing the Redis pool", self.pool.close(close_connection_pool=True), 2)
        self._pool = None


# While jobs run, an embedding worker polls sooner than a chat worker: its jobs last one forward pass
# of a few milliseconds a row, and a job found 50 ms late waited longer than it ran (bench/RESULTS.md).
EMBEDDING_BUSY_POLL_DELAY = 0.005


def _busy_poll_delay(settings: Settings) -> float:
    if settings.worker.busy_poll_delay is not None:
        return settings.worker.busy_poll_delay
    try:
        embeddings = embedding_spec(settings.model_path) is not None
    except EmbeddingModelError:
        embeddings = False  # a directory it cannot serve: the start-up reports it
    return EMBEDDING_BUSY_POLL_DELAY if embeddings else InferqWorker.busy_poll_delay


def build_worker(settings: Settings, *, burst: bool = False) -> InferqWorker:
    redis_url, _ = settings.require_urls()
    worker = InferqWorker(
        functions=[func(run_job, name=keys.JOB_FUNCTION, max_tries=settings.worker.max_tries)],
        queue_name=settings.queues.for_model(settings.served_model_name),
        redis_settings=RedisSettings.from_dsn(redis_url),
        max_jobs=settings.model.max_batch,
        poll_delay=settings.worker.poll_delay,
        job_timeout=settings.worker.job_timeout,
        keep_result=0,
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings, "wake": asyncio.Event()},
        burst=burst,
        handle_signals=True,
        # SIGTERM drains (see InferqWorker.handle_sig_wait_for_completion); 0 hands jobs back at once.
        job_completion_wait=int(settings.worker.drain_seconds),
    )
    worker.busy_poll_delay = _busy_poll_delay(settings)
    worker.poll_fallback = settings.worker.poll_fallback
    reserve = settings.worker.interactive_reserve
    if reserve is None:
        reserve = max(1, settings.model.max_batch // 4)
    worker.batch_queue = settings.queues.for_model(settings.served_model_name, batch=True)
    worker.batch_capacity = max(settings.model.max_batch - reserve, 0)
    return worker


def run(settings: Settings) -> None:
    # uvloop: the loop wakes once per engine step and once per poll; the C loop costs the model's
    # threads less CPU than asyncio's pure-Python one.
    asyncio.set_event_loop(uvloop.new_event_loop())
    try:
        build_worker(settings).run()
    except (VllmError, SidecarNotUp) as exc:
        # Errors that say what to do: the line itself, not a traceback around it.
        log.error("%s", exc)
        raise SystemExit(1) from None
    # The engine's thread was asked to stop and given its time; a thread still alive now would hold
    # the interpreter at exit for ever, and a supervisor would have to SIGKILL the worker.
    stuck = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and not t.name.startswith(_POOL_THREADS)
    ]
    if stuck:
        log.warning("threads still running after shutdown (%s); exiting anyway", ", ".join(stuck))
        logging.shutdown()
        os._exit(0)
