"""What the API knows of API keys, read from Postgres: whether keys are required, and each key's record
(kept for `auth_cache_seconds` in a bounded LRU, unknown ids included)."""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.models import ApiKey, AuthState
from shared.settings import Settings

# Enough for every key of a large deployment; an attacker cycling through made-up ids only pushes out
# the least recently used entries, one at a time, never the whole cache.
MAX_CACHED_KEYS = 10_000


@dataclass(frozen=True)
class StoredKey:
    id: str
    tenant: str
    key_hash: str
    rate_per_minute: int | None
    tokens_per_day: int | None
    revoked: bool
    admin: bool = False


class KeyStore:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.mode = settings.auth
        self.ttl = settings.auth_cache_seconds
        self.sessions = sessions
        self._admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self._keys: OrderedDict[str, tuple[float, StoredKey | None]] = OrderedDict()
        # `auto` only ever goes from open to closed: once closed, it stays so without asking again.
        self._closed = self._admin_key is not None

    async def required(self) -> bool:
        """Whether requests need a key. In `auto`, the open answer is never cached: the first key
        created anywhere closes every API process at its next request (one indexed read while open,
        which only an API that never had a key pays)."""
        if self.mode != "auto":
            return self.mode == "on"
        if not self._closed:
            async with self.sessions() as session:
                self._closed = bool(await session.scalar(select(exists().select_from(AuthState))))
        return self._closed

    @property
    def has_admin_key(self) -> bool:
        return self._admin_key is not None

    def is_admin_key(self, token: str) -> bool:
        """Whether the token is INFERQ_ADMIN_KEY (compared in constant time)."""
        return self._admin_key is not None and hmac.compare_digest(token.encode(), self._admin_key.encode())

    async def lookup(self, key_id: str) -> StoredKey | None:
        cached = self._keys.get(key_id)
        if cached is not None and time.monotonic() < cached[0]:
            self._keys.move_to_end(key_id)
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
                row.admin,
            )
        )
        self._keys[key_id] = (time.monotonic() + self.ttl, key)
        self._keys.move_to_end(key_id)
        while len(self._keys) > MAX_CACHED_KEYS:
            self._keys.popitem(last=False)
        return key
