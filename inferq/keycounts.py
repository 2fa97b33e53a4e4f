"""How many API keys are active and whether any ever existed, and what that means for auth: read by
`inferq up`'s banner and `inferq keys revoke` (which warns when it closes the API)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from shared.models import ApiKey, AuthState

CREATE_HINT = "create one with `inferq keys create --tenant NAME`"
SEND_KEY_HINT = (
    "send it as `Authorization: Bearer <key>` over HTTP, or `export INFERQ_API_KEY=<key>` for the CLI"
)
CLOSED_NOTE = (
    "every API key is revoked: the API now refuses every request (401) until a key is created "
    "(it never reopens by itself; only INFERQ_AUTH=off opens it)"
)


@dataclass(frozen=True)
class KeyCounts:
    active: int
    ever: bool  # a key has existed (auth_state has its row): `auto` requires keys for good


async def read_counts(conn: AsyncConnection | AsyncSession) -> KeyCounts:
    active = await conn.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))
    ever = await conn.scalar(select(exists().select_from(AuthState)))
    return KeyCounts(int(active or 0), bool(ever))


def count_keys(database_url: str) -> KeyCounts:
    """Blocking; call it outside an event loop."""
    from shared.db import create_engine

    async def count() -> KeyCounts:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await read_counts(conn)
        finally:
            await engine.dispose()

    return asyncio.run(count())


def keys_required(mode: str, counts: KeyCounts | None, admin_key: bool = False) -> bool:
    """What the API decides (api/tenancy/keystore.py), for what the banner tells the user."""
    if mode != "auto":
        return mode == "on"
    return admin_key or counts is None or counts.ever


def auth_line(mode: str, counts: KeyCounts | None, admin_key: bool = False) -> str:
    """The banner's word on API keys; `counts` is None when they could not be read."""
    if mode == "off":
        if counts is not None and counts.ever:
            return (
                f"auth: OFF (INFERQ_AUTH=off) — anyone who can reach this API reads and writes every "
                f"tenant's jobs; the {counts.active} active API key(s) are ignored. Unset INFERQ_AUTH to "
                "require them again."
            )
        return "auth: open (INFERQ_AUTH=off)"
    if not keys_required(mode, counts, admin_key):
        return (
            f"auth: open (no API key has been created; {CREATE_HINT}: from then on every request needs "
            "one, even after keys are revoked, and jobs made while open belong to tenant `default`)"
        )
    if counts is None:
        return f"auth: API keys required (`inferq keys list`); {SEND_KEY_HINT}"
    if counts.active == 0 and not admin_key:
        if counts.ever:
            return f"auth: closed — {CLOSED_NOTE}; {CREATE_HINT}"
        return f"auth: API keys required, and none exists yet: {CREATE_HINT}; {SEND_KEY_HINT}"
    return f"auth: API keys required: {SEND_KEY_HINT}"
