"""Async SQLAlchemy engine helpers and the schema-version check."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, make_url, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

import migrations

if TYPE_CHECKING:
    from alembic.script import Script, ScriptDirectory

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).parent


# The table each migration run records its schema's compatibility floor in (shared.models).
SCHEMA_TABLE = "inferq_schema"

SCHEMA_BEHIND = "database schema is at {current}, the code needs {head}: run `inferq migrate`"
SCHEMA_AHEAD_UNMARKED = (
    "database schema is at {current}, later than this code's {head}, and records no compatibility"
    " with older code: deploy code at {current}"
)
SCHEMA_AHEAD_INCOMPATIBLE = (
    "database schema is at {current}, which runs code from {floor} on; this code is at {head}:"
    " deploy code at {floor} or later"
)


class SchemaOutOfDate(RuntimeError):
    pass


def async_url(url: str) -> str:
    """Accept the usual `postgresql://` (or `postgres://`) URLs and pick the asyncpg driver."""
    parsed = make_url(
        url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url
    )
    if parsed.drivername in ("postgresql", "postgresql+psycopg2", "postgresql+psycopg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed.render_as_string(hide_password=False)


# A pooled connection idle for longer than this is pinged before it is used again (one that went away
# meanwhile, a Postgres restart say, is replaced instead of failing the statement). SQLAlchemy's own
# pool_pre_ping pings on every checkout, and its asyncpg ping is three round trips (BEGIN, `;`,
# ROLLBACK): more than the one statement of most sessions here, for every job and every request.
PING_IDLE_SECONDS = 1.0


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    engine = create_async_engine(async_url(url), pool_size=pool_size, max_overflow=pool_size)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
            return  # a new connection, or one in use a moment ago
        try:
            dbapi_connection.ping()
        except Exception as exc:
            # The pool drops this connection and checks out another (a new one, if need be).
            raise DisconnectionError(str(exc)) from exc


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _scripts(script_location: Path) -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return ScriptDirectory.from_config(cfg)


def head_revision(script_location: Path = MIGRATIONS_DIR) -> str | None:
    """The newest migration this code ships: the schema it was written for."""
    return _scripts(script_location).get_current_head()


def compatible_with_code_from(script: Script) -> str:
    """The oldest code revision that runs on the schema `script` leaves; a migration that declares
    nothing is a contract (only code at its own revision or later)."""
    declared = getattr(script.module, "compatible_with_code_from", None)
    return str(declared) if declared is not None else script.revision


def record_compatibility(connection: Connection, scripts: ScriptDirectory) -> None:
    """Write the floor of the revision `connection`'s database is now at, in the migration's transaction
    (migrations/env.py). Before the revision that creates the table there is nothing to write."""
    from alembic.migration import MigrationContext

    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None or connection.scalar(text(f"SELECT to_regclass('{SCHEMA_TABLE}')")) is None:
        return
    floor = compatible_with_code_from(scripts.get_revision(revision))
    connection.execute(
        text(
            f"INSERT INTO {SCHEMA_TABLE} (singleton, revision, compatible_with_code_from)"
            " VALUES (true, :revision, :floor) ON CONFLICT (singleton) DO UPDATE"
            " SET revision = excluded.revision,"
            " compatible_with_code_from = excluded.compatible_with_code_from, recorded_at = now()"
        ),
        {"revision": revision, "floor": floor},
    )


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
        if not exists:
            return None
        version = await conn.scalar(text("SELECT version_num FROM alembic_version LIMIT 1"))
        return str(version) if version is not None else None


async def _recorded_floor(engine: AsyncEngine, revision: str) -> str | None:
    """The floor recorded for `revision`, or None when none is (or it was recorded for another one)."""
    async with engine.connect() as conn:
        if await conn.scalar(text(f"SELECT to_regclass('{SCHEMA_TABLE}')")) is None:
            return None
        row = (
            await conn.execute(text(f"SELECT revision, compatible_with_code_from FROM {SCHEMA_TABLE}"))
        ).first()
    return str(row[1]) if row is not None and row[0] == revision else None


async def check_schema(engine: AsyncEngine, script_location: Path = MIGRATIONS_DIR) -> str:
    """Refuse to serve on a schema this code cannot run on; return the database's revision.

    The code runs on its own head, and on a later schema whose recorded floor is at or before its head
    (an expand migration during a rolling deploy). `script_location` is the migrations this code ships.
    """
    scripts = _scripts(script_location)
    head, current = scripts.get_current_head(), await current_revision(engine)
    if current is not None and current == head:
        return current
    if current is None or _knows(scripts, current):
        # Known and not the head: older than the code.
        raise SchemaOutOfDate(SCHEMA_BEHIND.format(current=current or "nothing", head=head))
    floor = await _recorded_floor(engine, current)
    if floor is None:
        raise SchemaOutOfDate(SCHEMA_AHEAD_UNMARKED.format(current=current, head=head))
    if not _knows(scripts, floor):
        raise SchemaOutOfDate(SCHEMA_AHEAD_INCOMPATIBLE.format(current=current, floor=floor, head=head))
    log.info("schema %s is later than this code's %s and runs code from %s on", current, head, floor)
    return current


def _knows(scripts: ScriptDirectory, revision: str) -> bool:
    # One linear history: every revision the code ships is at or before its head.
    return any(s.revision == revision for s in scripts.walk_revisions())


def upgrade(url: str, revision: str = "head", script_location: Path = MIGRATIONS_DIR) -> None:
    """Run `alembic upgrade` against `url` (blocking; call it outside an event loop)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["database_url"] = async_url(url)
    command.upgrade(cfg, revision)
