"""Storing new jobs: many concurrent submissions in one INSERT and one commit (see shared/grouped.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.models import Job

# clock_timestamp(), not now(): rows of one statement get their own, increasing, creation times
# (now() is the transaction's start, the same for all of them), so their order survives.
_INSERT = (
    insert(Job)
    .values(created_at=func.clock_timestamp())
    .returning(Job.created_at, sort_by_parameter_order=True)
)

_COLUMNS = (
    *("id", "status", "model", "request", "metadata_", "prompt_tokens", "attempts", "tenant"),
    *("api_key_id", "request_id", "cancel_at", "timeout_seconds", "deadline_at"),
)


def job_row(job: Job) -> dict[str, Any]:
    """The columns a new interactive job is inserted with, by column name (a core INSERT ignores a key
    it does not know, such as the attribute name `metadata_` of the column `metadata`)."""
    return {Job.__mapper__.attrs[name].columns[0].key: getattr(job, name) for name in _COLUMNS}


async def _insert(db: AsyncEngine, rows: list[dict[str, Any]]) -> list[datetime]:
    async with db.begin() as conn:
        result = await conn.execute(_INSERT, rows)
        return [created for (created,) in result]


async def insert_jobs(db: AsyncEngine, rows: list[dict[str, Any]]) -> list[datetime | BaseException]:
    """Insert the rows in one statement and one transaction; each row's created_at, in order. When
    the group fails, each row is tried alone, so that a row Postgres refuses fails only itself."""
    try:
        return list(await _insert(db, rows))
    except Exception as exc:
        if len(rows) == 1:
            return [exc]
    outcomes: list[datetime | BaseException] = []
    for row in rows:
        try:
            outcomes.extend(await _insert(db, [row]))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
