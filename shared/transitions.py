"""Every change of a job's status is one SQL UPDATE built here, its guard generated from
`shared.states.ALLOWED`: the table is the code, and a move it does not list cannot be written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Update, bindparam, cast, column, func, update
from sqlalchemy.dialects.postgresql import ARRAY

from shared.models import Job
from shared.states import ALLOWED, JobStatus


class ForbiddenMove(ValueError):
    """A move the state table does not list: a bug in the code that asked for it."""


def sources(to: JobStatus) -> frozenset[JobStatus]:
    """The states a job may move to `to` from."""
    return frozenset(src for src, moves in ALLOWED.items() if to in moves)


def move(to: JobStatus, *where: ColumnElement[bool], src: JobStatus | None = None, **values: Any) -> Update:
    """`UPDATE jobs SET status = to, **values WHERE status IN (the states the table lets reach `to`)
    AND where...`. `src` narrows the guard to one of those states (the reaper moves running jobs only,
    though a queued one may be cancelled too); the other conditions (the job, its attempt: the final
    write's exactly-once guard) come in `where`. Its rowcount says whether the job moved."""
    if "status" in values:
        raise TypeError("the new status is `to`, not a value")
    allowed = sources(to)
    if src is not None:
        if src not in allowed:
            raise ForbiddenMove(f"a job cannot move from {src.value} to {to.value}")
        allowed = frozenset({src})
    if not allowed:
        raise ForbiddenMove(f"no state moves to {to.value}")
    guard: ColumnElement[bool]
    if len(allowed) == 1:
        guard = Job.status == next(iter(allowed)).value
    else:
        guard = Job.status.in_(sorted(s.value for s in allowed))
    return update(Job).where(guard, *where).values(status=to.value, **values)


def move_each(
    to: JobStatus,
    rows: Sequence[Mapping[str, Any]],
    *where: ColumnElement[bool],
    match: tuple[str, ...] = ("id",),
    src: JobStatus | None = None,
    **values: Any,
) -> Update:
    """`move` for many jobs in one statement, each with values of its own: `rows` (one mapping per job,
    all with the same keys) become one array per key, unnested into a table the UPDATE joins on the
    `match` columns (the job, and its attempt for a final write's guard); every other key of a row is
    set from the row, `values` are set on every job. Add `.returning(Job.id)` to learn which jobs moved.

    Arrays, not a VALUES list: the statement is the same for any number of rows, so SQLAlchemy compiles
    it once and asyncpg prepares it once (a VALUES list of literal rows has no cache key: it was built,
    compiled and prepared again for every group, 4-5 ms of the worker's loop each time)."""
    if not rows:
        raise ValueError("no jobs to move")
    names = list(rows[0])
    table = Job.__table__
    arrays = [
        bindparam(f"each_{name}", [row[name] for row in rows], type_=ARRAY(table.c[name].type))
        for name in names
    ]
    each = (
        func.unnest(*arrays)
        .table_valued(*(column(name, table.c[name].type) for name in names))
        .render_derived(name="each")
    )
    typed = {name: cast(each.c[name], table.c[name].type) for name in names}
    joined = [table.c[name] == typed[name] for name in match]
    own = {name: typed[name] for name in names if name not in match}
    return move(to, *joined, *where, src=src, **own, **values)
