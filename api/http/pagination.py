"""Cursor pages, newest first, over a tenant's rows of one table (jobs, files, batches, webhook
endpoints and their deliveries)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from api.http.errors import InvalidRequest
from api.tenancy.auth import Principal
from shared.models import Batch, File, Job, WebhookDelivery, WebhookEndpoint

Row = TypeVar("Row", Job, File, Batch, WebhookEndpoint, WebhookDelivery)


async def newest_first(
    session: AsyncSession,
    principal: Principal,
    model: type[Row],
    stmt: Select[Any],
    *,
    after: str | None,
    limit: int,
    noun: str,
) -> tuple[list[Row], bool]:
    """One page of `stmt` (a select of `model`, already filtered) after the row `after`, and whether
    there are more."""
    stmt = principal.scope(stmt, model.tenant)
    if after is not None:
        cursor = (
            await session.execute(
                principal.scope(select(model.created_at, model.id).where(model.id == after), model.tenant)
            )
        ).one_or_none()
        if cursor is None:
            raise InvalidRequest(f"'after' names no {noun}: '{after}'", param="after")
        stmt = stmt.where(tuple_(model.created_at, model.id) < tuple_(cursor.created_at, cursor.id))
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows: list[Row] = list((await session.execute(stmt)).scalars())
    return rows[:limit], len(rows) > limit
