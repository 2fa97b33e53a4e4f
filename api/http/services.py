"""Everything a request handler needs, built once in the lifespan and closed with it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis, RedisCluster
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.jobs.capabilities import FleetCapabilities
from api.jobs.enqueue import Enqueue, enqueue_many
from api.jobs.finished import read_finished
from api.jobs.inserts import insert_jobs
from api.streams.relay import RelayHub
from api.streams.sharded import ShardedRelayHub
from api.tenancy.keystore import KeyStore
from shared.capabilities import Capabilities, embedding_engine
from shared.db import check_schema, create_engine, session_factory
from shared.embeddings import EmbeddingSpec, read_spec
from shared.eventredis import EventsRedis, check_queue_redis, connect_events
from shared.events import EventWriter
from shared.grouped import Grouped
from shared.models import Job
from shared.settings import EXTRA_MODEL_HINT, Settings, require_dir

if TYPE_CHECKING:
    from api.http.metrics import ApiMetrics
    from api.jobs.admission import Admission


@dataclass
class ModelInfo:
    name: str
    tokenizer: Any
    context_length: int
    embedding: EmbeddingSpec | None = None  # a sentence-transformers model: it serves embeddings only

    def declared(self) -> Capabilities | None:
        """What its workers will honour when that is known from its files alone (an embedding model)."""
        if self.embedding is None:
            return None
        return embedding_engine(shortening=self.embedding.shortening)


@dataclass
class Services:
    settings: Settings
    db: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis  # the queue's: arq, leases, the registry, rate limits, the cancel broadcast
    events_redis: EventsRedis  # job events and cancel flags: the queue's Redis, or a cluster
    events: EventWriter
    relay: RelayHub | ShardedRelayHub
    model: ModelInfo  # the default: the one jobs that name no model run on
    models: dict[str, ModelInfo]
    auth: KeyStore
    admission: Admission = field(init=False)
    capabilities: FleetCapabilities = field(init=False)
    insert_job: Grouped[dict[str, Any], datetime] = field(init=False)  # group commit of new jobs
    enqueue_job: Grouped[Enqueue, bool] = field(init=False)  # pipelined enqueues
    read_finished: Grouped[str, Job | None] = field(init=False)  # ended jobs read for their waiters
    metrics: ApiMetrics = field(init=False)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    started_at: int = field(default_factory=lambda: int(time.time()))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` past the request that started it (e.g. a cancel after the client left)."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _load_model_info(name: str, path: str, gguf_file: str | None = None) -> ModelInfo:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    config = AutoConfig.from_pretrained(path, **kwargs)
    context = int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 30
    # Only a local directory can be a sentence-transformers model here (a hub id is read by transformers).
    embedding = read_spec(path) if Path(path).is_dir() and not gguf_file else None
    return ModelInfo(name, tokenizer, context, embedding)


def _load_models(settings: Settings) -> dict[str, ModelInfo]:
    models = {
        settings.served_model_name: _load_model_info(
            settings.served_model_name, settings.require_model_dir(), settings.model.gguf_file
        )
    }
    for name, path in settings.extra_models.items():
        models.setdefault(name, _load_model_info(name, require_dir(path, EXTRA_MODEL_HINT)))
    return models


@contextlib.asynccontextmanager
async def open_services(settings: Settings, metrics: ApiMetrics) -> AsyncIterator[Services]:
    redis_url, database_url = settings.require_urls()
    db = create_engine(database_url)
    redis: ArqRedis | None = None
    events_redis: EventsRedis | None = None
    owns_events_redis = False
    events: EventWriter | None = None
    relay: RelayHub | ShardedRelayHub | None = None
    services: Services | None = None
    try:
        await check_schema(db)
        models = await asyncio.to_thread(_load_models, settings)
        redis = await create_pool(RedisSettings.from_dsn(redis_url), retry=0)
        await check_queue_redis(redis)
        events_redis, owns_events_redis = await connect_events(
            settings.events.redis_url or redis_url,
            settings.events.cluster,
            None if settings.events.redis_url else redis,
        )
        if isinstance(events_redis, RedisCluster):
            relay = ShardedRelayHub(events_redis)
        else:
            assert isinstance(events_redis, Redis)
            relay = RelayHub(events_redis)
        await relay.start()
        events = EventWriter(
            events_redis, maxlen=settings.events.stream_maxlen, ttl_seconds=settings.events.ttl_seconds
        )
        sessions = session_factory(db)
        services = Services(
            settings,
            db,
            sessions,
            redis,
            events_redis,
            events,
            relay,
            models[settings.served_model_name],
            models,
            KeyStore(settings, sessions),
        )
        from api.jobs.admission import Admission  # it needs Services itself

        services.admission = Admission(services)
        declared = {name: caps for name, info in models.items() if (caps := info.declared()) is not None}
        services.capabilities = FleetCapabilities(redis, settings, declared)
        services.insert_job = Grouped(partial(insert_jobs, db))
        services.enqueue_job = Grouped(partial(enqueue_many, redis))
        services.read_finished = Grouped(partial(read_finished, sessions))
        services.metrics = metrics
        yield services
    finally:
        if services is not None and services.background:
            await asyncio.wait(services.background, timeout=5)
        if relay is not None:
            await relay.stop()
        if events is not None:
            await events.aclose()
        if events_redis is not None and owns_events_redis:
            await events_redis.aclose()
        if redis is not None:
            await redis.aclose()
        await db.dispose()
