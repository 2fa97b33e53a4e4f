"""What each model's workers honour, read from their registry entries (a second's snapshot per API
process), and the check every new job passes at submit: a field no worker would honour is a 400."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from api.http.errors import InvalidRequest
from shared.capabilities import Capabilities, common, declared
from shared.fleet import live_workers
from shared.settings import Settings

# A worker that starts or stops changes what is honoured within this long on each API process.
_SNAPSHOT_SECONDS = 1.0


class FleetCapabilities:
    def __init__(
        self, redis: Redis, settings: Settings, by_model: Mapping[str, Capabilities] | None = None
    ) -> None:
        self._redis = redis
        self._fallback = declared(
            settings.worker.engine, settings.model.device, settings.worker.upstream_capabilities
        )
        # Models whose kind their files tell (embedding models): what their workers will declare.
        self._declared = dict(by_model or {})
        self._snapshot: tuple[float, dict[str, Capabilities]] = (0.0, {})

    async def _live(self) -> dict[str, Capabilities]:
        at, by_model = self._snapshot
        if time.monotonic() - at < _SNAPSHOT_SECONDS:
            return by_model
        found: dict[str, list[Capabilities]] = {}
        for worker in await live_workers(self._redis):
            caps = worker.get("capabilities")
            model = worker.get("model")
            if isinstance(caps, Mapping) and model:
                found.setdefault(str(model), []).append(Capabilities.from_json(caps))
        by_model = {model: c for model, caps in found.items() if (c := common(caps)) is not None}
        self._snapshot = (time.monotonic(), by_model)
        return by_model

    async def of(self, model: str) -> Capabilities:
        """What every live worker of `model` honours; with none live, what the model's files declare (an
        embedding model) or else this deployment's configured engine (the job waits for a worker)."""
        return (await self._live()).get(model) or self._declared.get(model, self._fallback)

    async def check(self, model: str, request: Mapping[str, Any]) -> None:
        refused = (await self.of(model)).refusal(request, model)
        if refused is not None:
            param, message = refused
            raise InvalidRequest(message, param=param, code="unsupported_parameter")
