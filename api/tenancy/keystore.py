"""What the API knows of API keys, read from Postgres and kept for `auth_cache_seconds`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.models import ApiKey
from shared.settings import Settings


@dataclass(frozen=True)
class StoredKey:
    id: str
    tenant: str
    key_hash: str
    rate_per_minute: int | None
    tokens_per_day: int | None
    revoked: bool


class KeyStore:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.mode = settings.auth
        self.ttl = settings.auth_cache_seconds
        self.sessions = sessions
        self._keys: dict[str, tuple[float, StoredKey | None]] = {}
        self._required: tuple[float, bool] = (0.0, False)

    async def required(self) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        expires, value = self._required
        if time.monotonic() < expires:
            return value
        async with self.sessions() as session:
            count = await session.scalar(select(func.count()).where(ApiKey.revoked_at.is_(None)))
        value = bool(count)
        self._required = (time.monotonic() + self.ttl, value)
        return value

    async def lookup(self, key_id: str) -> StoredKey | None:
        cached = self._keys.get(key_id)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        async with self.sessions() as session:
            row = await session.get(ApiKey, key_id)
        key = (
            None
            if row is None
            else StoredKey(
                row.id,
                row.tenant,
                row.key_hash,
                row.rate_per_minute,
                row.tokens_per_day,
                row.revoked_at is not None,
            )
        )
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key_id] = (time.monotonic() + self.ttl, key)
        return key
