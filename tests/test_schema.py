"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from shared.models import Base
from tests.conftest import Stack


async def test_schema_migrations_match_the_models(stack: Stack) -> None:
    engine = create_async_engine(stack.servers.database_url)

    def diff(conn: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()
