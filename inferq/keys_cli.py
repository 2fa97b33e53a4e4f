"""`inferq keys`: create, list and revoke API keys, straight in Postgres (an admin's tool, not an API
client)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from inferq.keycounts import CLOSED_NOTE, KeyCounts, read_counts
from inferq.stack import stack_file
from shared.settings import get_settings

if TYPE_CHECKING:
    from shared.db import AsyncSession
    from shared.models import ApiKey

# SQLAlchemy and the models are imported where used: cli.py imports this module, and `inferq submit`
# and the other API clients should not pay for them at start-up.

app = typer.Typer(help="Manage API keys (talks to Postgres directly).", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_NAME = 200  # api_keys.name is a VARCHAR(200)

T = TypeVar("T")


def _die(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _database_url() -> str:
    settings = get_settings()
    if settings.database_url:
        return settings.database_url
    path = stack_file(settings)
    try:
        url = json.loads(path.read_text())["database_url"]
    except FileNotFoundError:
        _die(
            "no database: set INFERQ_DATABASE_URL, or run `inferq up` (it writes the URL to its data dir)", 2
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _die(f"cannot read the database URL from {path}: {exc}", 2)
    if not isinstance(url, str) or not url:
        _die(f"{path} names no database_url", 2)
    return url


def _shown(url: str) -> str:
    from sqlalchemy import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"


async def _session_run(url: str, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db import SchemaOutOfDate, check_schema, create_engine, session_factory

    engine = create_engine(url, pool_size=1)
    try:
        try:
            await check_schema(engine)
        except SchemaOutOfDate as exc:
            _die(str(exc), 2)
        except (OSError, SQLAlchemyError) as exc:
            # The driver's own error says why (refused, no such database, bad password); SQLAlchemy's
            # wrapper adds only noise.
            cause = getattr(exc, "orig", None) or exc
            _die(f"cannot reach the database at {_shown(url)}: {cause}", 2)
        async with session_factory(engine)() as session:
            return await work(session)
    finally:
        await engine.dispose()


def _db(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    return asyncio.run(_session_run(_database_url(), work))


def _limit(value: int | None, unit: str) -> str:
    return f"{value}{unit}" if value is not None else "unlimited"


def _when(ts: datetime | None) -> str:
    return ts.astimezone().strftime("%Y-%m-%d %H:%M") if ts is not None else ""


def _day(ts: datetime | None) -> str:
    return ts.astimezone().strftime("%Y-%m-%d") if ts is not None else ""


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="Who the key acts for: 1-64 of A-Z a-z 0-9 . _ -")],
    name: Annotated[str | None, typer.Option(help="A note to tell keys apart.")] = None,
    rate: Annotated[int | None, typer.Option(min=1, help="Requests per minute (default: no limit).")] = None,
    token_quota: Annotated[
        int | None, typer.Option(min=1, help="Generated tokens per day (default: no limit).")
    ] = None,
    admin: Annotated[
        bool,
        typer.Option(
            "--admin", help="May see the whole fleet (every worker's jobs, hosts, pids); acts for its tenant."
        ),
    ] = False,
) -> None:
    """Create a key; print it once on stdout (KEY=$(inferq keys create --tenant a))."""
    if not TENANT.fullmatch(tenant):
        raise typer.BadParameter("1 to 64 characters of A-Z a-z 0-9 . _ -", param_hint="--tenant")
    if name is not None and len(name) > MAX_NAME:
        raise typer.BadParameter(f"at most {MAX_NAME} characters", param_hint="--name")
    from shared.apikeys import hash_key, new_key
    from shared.models import ApiKey, new_key_id

    key_id = new_key_id()
    key = new_key(key_id)

    async def insert(session: AsyncSession) -> None:
        async with session.begin():
            session.add(
                ApiKey(
                    id=key_id,
                    tenant=tenant,
                    name=name,
                    key_hash=hash_key(key),
                    rate_per_minute=rate,
                    tokens_per_day=token_quota,
                    admin=admin,
                )
            )

    _db(insert)
    # Only the key goes to stdout, so that a shell can capture it; the rest is for the person.
    sys.stdout.write(key + "\n")
    sys.stdout.flush()
    err.print(
        f"[green]created {key_id}[/] for tenant {escape(tenant)}"
        f"{f' ({escape(name)})' if name else ''}: {_limit(rate, '/min')} requests, "
        f"{_limit(token_quota, '/day')} tokens{', admin view of the fleet' if admin else ''}",
        soft_wrap=True,
    )
    err.print("[bold]store the key now: it is not shown again[/] (only its SHA-256 hash is kept)")


def _row(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "tenant": k.tenant,
        "name": k.name,
        "rate_per_minute": k.rate_per_minute,
        "tokens_per_day": k.tokens_per_day,
        "admin": k.admin,
        "created_at": k.created_at.isoformat(),
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
    }


@app.command("list")
def list_keys(
    show_all: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List keys (never the keys themselves, which are not stored), oldest first."""
    from sqlalchemy import select

    from shared.models import ApiKey

    async def fetch(session: AsyncSession) -> list[ApiKey]:
        stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not show_all:
            stmt = stmt.where(ApiKey.revoked_at.is_(None))
        return list((await session.scalars(stmt)).all())

    found = _db(fetch)
    if as_json:
        sys.stdout.write(json.dumps([_row(k) for k in found], indent=2) + "\n")
        return
    if not found:
        console.print("no API keys" if show_all else "no active API keys (--all shows revoked ones)")
        return
    # Light borders and dates without times keep it within 80 columns; --json has the exact times.
    table = Table(box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    # Ids and tenants are copied from here: never wrapped or cut; a long name wraps instead.
    table.add_column("id", no_wrap=True, min_width=max(len(k.id) for k in found))
    table.add_column("tenant", no_wrap=True, min_width=max(len(k.tenant) for k in found))
    table.add_column("name")
    table.add_column("admin", no_wrap=True)
    for header in ("rate/min", "tokens/day", "created", *(("revoked",) if show_all else ())):
        table.add_column(header, no_wrap=True)
    for k in found:
        cells = [k.id, k.tenant, k.name or "", "yes" if k.admin else ""]
        cells += [str(k.rate_per_minute or "-"), str(k.tokens_per_day or "-")]
        cells += [_day(k.created_at), *((_day(k.revoked_at),) if show_all else ())]
        table.add_row(*(Text(c) for c in cells))  # Text: names are not rich markup
    console.print(table)


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The key's id (key_...).")]) -> None:
    """Revoke a key; API processes stop accepting it within INFERQ_AUTH_CACHE_SECONDS."""
    from sqlalchemy import func, update

    from shared.models import ApiKey

    async def mark(session: AsyncSession) -> tuple[str | None, ApiKey | None, KeyCounts]:
        async with session.begin():
            stmt = (
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=func.now())
                .returning(ApiKey.tenant)
            )
            tenant = await session.scalar(stmt)
            existing = None if tenant is not None else await session.get(ApiKey, key_id)
            return tenant, existing, await read_counts(session)

    tenant, existing, counts = _db(mark)
    if tenant is None:
        if existing is None:
            _die(f"no API key {key_id}", 1)
        _die(f"{key_id} was already revoked ({_when(existing.revoked_at)})", 1)
    wait = get_settings().auth_cache_seconds
    console.print(
        f"revoked {escape(key_id)} (tenant {escape(tenant)}); the API refuses it within {wait:g}s",
        soft_wrap=True,
    )
    if counts.active == 0:
        # The last one: in `auto` the API stays closed, it never falls back to open.
        err.print(f"[bold yellow]that was the last active key: {CLOSED_NOTE}[/]", soft_wrap=True)
