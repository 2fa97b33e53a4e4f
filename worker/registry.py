"""The worker's entry in the fleet registry (shared.fleet): rewritten every heartbeat, with a TTL of
`dead_after_missed` heartbeats, so that a worker that stops beating disappears on its own."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from redis.asyncio import Redis

from shared import __version__, fleet
from shared.settings import Settings
from worker import metrics
from worker.embedder import Embedder
from worker.engines.base import Engine
from worker.jobs import JobRunner

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self, redis: Redis, worker_id: str, settings: Settings, engine: Engine | Embedder, runner: JobRunner
    ) -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.settings = settings
        self.engine = engine
        self.runner = runner
        # Where this worker's /metrics is, for Prometheus and people reading `GET /v1/workers`.
        self.metrics_url = metrics.public_url(
            settings.worker.metrics_port, settings.worker.metrics_host, settings.worker.advertise_host
        )
        self.started_at = time.time()
        self.draining = False
        self._last: tuple[float, int] = (time.monotonic(), engine.stats.tokens)
        self._rate = 0.0
        self._busy_rate = 0.0
        self._peak = 0.0
        self._was_busy = False
        self._task: asyncio.Task[None] | None = None

    def info(self) -> dict[str, Any]:
        now, tokens = time.monotonic(), self.engine.stats.tokens
        then, before = self._last
        busy = self.engine.stats.active > 0
        if now > then:
            rate = (tokens - before) / (now - then)
            # Smoothed over a few beats: a steady figure, not one step's burst.
            self._rate = 0.7 * self._rate + 0.3 * rate
            if busy and self._was_busy:
                # Only beats the engine spent working tell what it can do; idle ones would dilute it.
                self._busy_rate = rate if self._busy_rate == 0 else 0.7 * self._busy_rate + 0.3 * rate
                self._peak = max(self._peak, self._busy_rate)
        self._last = (now, tokens)
        self._was_busy = busy
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.settings.model.device,
            "model": self.settings.served_model_name,
            "capacity": self.settings.model.max_batch,
            "running": len(self.runner.running),
            "jobs": sorted(self.runner.running),
            "tokens_per_s": round(self._rate, 2),
            # The best rate seen: what the API's admission control expects this worker can do.
            "tokens_per_s_peak": round(self._peak, 2),
            "tokens": tokens,
            "steps": self.engine.stats.steps,
            "peak_batch_size": self.engine.stats.peak_batch_size,
            "draining": self.draining,
            "started_at": self.started_at,
            "version": __version__,
            "metrics_url": self.metrics_url,
            "capabilities": self.engine.capabilities().to_json(),
        }

    async def beat(self) -> None:
        ttl_ms = int(self.settings.worker.heartbeat_seconds * self.settings.worker.dead_after_missed * 1000)
        await fleet.register(self.redis, self.info(), ttl_ms)

    async def _run(self) -> None:
        while True:
            if not self.engine.healthy and not self.draining:
                # The engine's thread died: this worker can run nothing more. Stop taking jobs and leave,
                # so that the process supervisor starts a fresh one.
                log.error("the engine stopped working; the worker shuts down")
                os.kill(os.getpid(), signal.SIGTERM)
                self.draining = True
            try:
                await self.beat()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.worker.heartbeat_seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await fleet.deregister(self.redis, self.worker_id)
        except Exception as exc:
            log.warning("could not remove the registry entry: %s", exc)
