"""Rolling deploys: code starts on its own schema or on a later one that records it compatible (expand,
then contract; docs/migrations.md), and refuses an older one. Real Postgres, real Alembic migrations.

"Old code" is this code with the migrations it would have shipped: a copy of migrations/ without the
newest revision. A test-made expand and contract migration stand in for the next release's.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from sqlalchemy import make_url, text

from shared.db import (
    MIGRATIONS_DIR,
    SCHEMA_AHEAD_INCOMPATIBLE,
    SCHEMA_AHEAD_UNMARKED,
    SCHEMA_BEHIND,
    SchemaOutOfDate,
    check_schema,
    compatible_with_code_from,
    create_engine,
    upgrade,
)
from tests.conftest import REPO, Servers, _admin

EXPAND, CONTRACT = "t_expand", "t_contract"


def _scripts(location: Path = MIGRATIONS_DIR) -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    return ScriptDirectory.from_config(cfg)


def _chain() -> list[Script]:
    """The shipped migrations, oldest first."""
    return list(reversed(list(_scripts().walk_revisions())))


def _head() -> tuple[Script, str]:
    """The newest shipped migration, and the revision before it (the code one release behind)."""
    head = _chain()[-1]
    assert isinstance(head.down_revision, str), "the newest migration has one parent"
    return head, head.down_revision


def _tree(dest: Path, *, drop: str | None = None, extra: dict[str, str] | None = None) -> Path:
    """A copy of migrations/ without the file of revision `drop`, plus `extra` files in versions/."""
    shutil.copytree(MIGRATIONS_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    if drop is not None:
        (dest / "versions" / Path(_scripts().get_revision(drop).path).name).unlink()
    for name, source in (extra or {}).items():
        (dest / "versions" / name).write_text(textwrap.dedent(source))
    return dest


def _migration(revision: str, down: str, floor: str, up: str, down_sql: str) -> str:
    return f'''
        """{revision}: made by tests/test_migrations.py"""
        from alembic import op

        revision = {revision!r}
        down_revision = {down!r}
        branch_labels = None
        depends_on = None
        compatible_with_code_from = {floor!r}


        def upgrade() -> None:
            op.execute({up!r})


        def downgrade() -> None:
            op.execute({down_sql!r})
        '''


@pytest.fixture
async def database(servers: Servers) -> AsyncIterator[str]:
    """A database of this test's own on the test server, empty: the migrations are the test's."""
    name = f"inferq_mig_{secrets.token_hex(4)}"
    await _admin(servers.database_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(servers.database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _migrate(url: str, revision: str, location: Path = MIGRATIONS_DIR) -> None:
    # env.py runs its own event loop: Alembic goes to a thread, as `inferq migrate` runs outside one.
    await asyncio.to_thread(upgrade, url, revision, location)


async def _downgrade(url: str, revision: str, location: Path) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["database_url"] = url
    await asyncio.to_thread(command.downgrade, cfg, revision)


async def _check(url: str, location: Path = MIGRATIONS_DIR) -> str:
    """check_schema as code shipping the migrations at `location` runs it at start; the refusal's text."""
    engine = create_engine(url, pool_size=1)
    try:
        await check_schema(engine, location)
        return ""
    except SchemaOutOfDate as exc:
        return str(exc)
    finally:
        await engine.dispose()


async def _recorded(url: str) -> tuple[str, str] | None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(text("SELECT revision, compatible_with_code_from FROM inferq_schema"))
            ).first()
            return (row[0], row[1]) if row is not None else None
    finally:
        await engine.dispose()


def test_migrations_each_declares_a_floor_between_the_last_ones_and_itself() -> None:
    chain = _chain()
    order = {s.revision: i for i, s in enumerate(chain)}
    last = 0
    for i, script in enumerate(chain):
        floor = compatible_with_code_from(script)
        assert floor in order, f"{script.path}: compatible_with_code_from {floor!r} names no migration"
        assert last <= order[floor] <= i, (
            f"{script.path}: compatible_with_code_from {floor!r} must lie between the previous migration's"
            f" floor ({chain[last].revision}) and itself: a floor never moves back"
        )
        last = order[floor]
    # From the table that records it on, every migration says what it is: nothing falls back to a default.
    start = order["0010"]
    for script in chain[start:]:
        assert hasattr(script.module, "compatible_with_code_from"), f"{script.path} declares no floor"


async def test_migrations_code_one_revision_behind_starts_on_the_head_it_is_compatible_with(
    database: str, tmp_path: Path
) -> None:
    head, previous = _head()
    await _migrate(database, "head")
    floor = compatible_with_code_from(head)
    assert await _recorded(database) == (head.revision, floor)
    assert await _check(database) == ""

    old = _tree(tmp_path / "old", drop=head.revision)
    if floor == head.revision:  # the newest migration is a contract: old code must stay out
        assert await _check(database, old) == SCHEMA_AHEAD_INCOMPATIBLE.format(
            current=head.revision, floor=floor, head=previous
        )
    else:
        assert await _check(database, old) == ""


async def test_migrations_a_contract_refuses_code_older_than_its_floor(database: str, tmp_path: Path) -> None:
    head, previous = _head()
    expand = _migration(
        EXPAND,
        head.revision,
        compatible_with_code_from(head),
        "CREATE TABLE t_probe (x int)",
        "DROP TABLE t_probe",
    )
    contract = _migration(CONTRACT, EXPAND, EXPAND, "DROP TABLE t_probe", "CREATE TABLE t_probe (x int)")
    next_release = _tree(tmp_path / "next", extra={"t1_expand.py": expand})
    after = _tree(tmp_path / "after", extra={"t1_expand.py": expand, "t2_contract.py": contract})
    old = _tree(tmp_path / "old", drop=head.revision)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["INFERQ_DATABASE_URL"] = database

    # The next release's expand migration has run: this code (one release behind) still starts,
    # knowing nothing of the new revision but what the database records.
    await _migrate(database, EXPAND, after)
    assert await _recorded(database) == (EXPAND, compatible_with_code_from(head))
    assert await _check(database) == ""
    assert await _check(database, next_release) == ""
    keys = await asyncio.to_thread(_cli, env, "keys", "list")
    assert keys.returncode == 0, keys.stderr

    # Its contract migration: only code from the expand's release on.
    await _migrate(database, "head", after)
    assert await _recorded(database) == (CONTRACT, EXPAND)
    refused = SCHEMA_AHEAD_INCOMPATIBLE.format(current=CONTRACT, floor=EXPAND, head=head.revision)
    assert await _check(database) == refused
    assert await _check(database, old) == SCHEMA_AHEAD_INCOMPATIBLE.format(
        current=CONTRACT, floor=EXPAND, head=previous
    )
    assert await _check(database, next_release) == ""
    assert await _check(database, after) == ""
    keys = await asyncio.to_thread(_cli, env, "keys", "list")
    assert keys.returncode == 2 and refused in " ".join(keys.stderr.split()), keys.stderr

    # A downgrade records the floor of the revision it lands on.
    await _downgrade(database, EXPAND, after)
    assert await _recorded(database) == (EXPAND, compatible_with_code_from(head))
    assert await _check(database) == ""

    # A later schema that records nothing (or records another revision) is refused: the code cannot know.
    engine = create_engine(database, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE inferq_schema SET revision = 'elsewhere'"))
    finally:
        await engine.dispose()
    assert await _check(database) == SCHEMA_AHEAD_UNMARKED.format(current=EXPAND, head=head.revision)


async def test_migrations_a_schema_behind_the_code_is_refused_naming_inferq_migrate(
    database: str,
) -> None:
    head, previous = _head()
    await _migrate(database, previous)
    refused = SCHEMA_BEHIND.format(current=previous, head=head.revision)
    assert "run `inferq migrate`" in refused
    assert await _check(database) == refused
    # The same refusal from a real entry point, and no start.
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["INFERQ_DATABASE_URL"] = database
    keys = await asyncio.to_thread(_cli, env, "keys", "list")
    assert keys.returncode == 2 and refused in " ".join(keys.stderr.split()), keys.stderr
    # Once migrated, it starts.
    await _migrate(database, "head")
    assert await _check(database) == ""


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
