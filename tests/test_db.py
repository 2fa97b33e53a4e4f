"""The Postgres pool (shared.db.create_engine): a connection that died while it sat idle in the pool is
found by a ping when it is next checked out and replaced, so the session that takes it works; one used a
moment ago is not pinged (a ping is three round trips), so it meets its death at its statement."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import db
from tests.conftest import Servers, _admin


async def _kill_pooled_connection(engine: AsyncEngine, database_url: str) -> None:
    async with engine.connect() as conn:
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
    await _admin(database_url, f"SELECT pg_terminate_backend({int(pid)})")


async def _one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT 1")))


async def test_db_pool_replaces_a_connection_that_died_while_idle(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.create_engine(servers.database_url, pool_size=1)
    try:
        # Idle longer than the threshold (0 s here): pinged at checkout, replaced, and the query works.
        monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)
        await _kill_pooled_connection(engine, servers.database_url)
        assert await _one(engine) == 1
        # In use a moment ago (threshold of an hour): not pinged, so the dead connection fails the query.
        monkeypatch.setattr(db, "PING_IDLE_SECONDS", 3600.0)
        await _kill_pooled_connection(engine, servers.database_url)
        with pytest.raises(DBAPIError):
            await _one(engine)
        assert await _one(engine) == 1  # the pool dropped it: the next session has a new one
    finally:
        await engine.dispose()
