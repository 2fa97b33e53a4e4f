"""The job state machine is one closed set, and the table is the code: every status change of a job is
shared.transitions.move, whose guard, run against Postgres, lets through exactly the table's moves."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.models import Job
from shared.states import ALLOWED, TERMINAL, JobStatus, can_move
from shared.transitions import ForbiddenMove, move, move_each
from tests.conftest import REPO, Servers, _env


def test_states_are_one_closed_set_and_final_states_are_final() -> None:
    assert set(ALLOWED) == set(JobStatus)
    for state, moves in ALLOWED.items():
        assert moves <= set(JobStatus) and state not in moves
        assert (state in TERMINAL) == (not moves), state
    for state in JobStatus:  # nothing is stuck: a final state is reachable from everywhere
        seen, todo = {state}, [state]
        while todo:
            for nxt in ALLOWED[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & TERMINAL, state


def test_states_a_move_the_table_lacks_cannot_be_written() -> None:
    for src in JobStatus:
        for dst in JobStatus:
            if can_move(src, dst):
                move(dst, src=src)
            else:
                with pytest.raises(ForbiddenMove):
                    move(dst, src=src)
    with pytest.raises(TypeError):
        move(JobStatus.SUCCEEDED, status=JobStatus.QUEUED.value)


@pytest.fixture
async def db(servers: Servers, model_dir: Path) -> AsyncIterator[AsyncEngine]:
    migrate = [sys.executable, "-m", "inferq.cli", "migrate"]
    subprocess.run(migrate, env=_env(servers, model_dir), cwd=REPO, check=True, capture_output=True)
    engine = create_async_engine(servers.database_url)
    try:
        yield engine
    finally:
        async with engine.begin() as conn:
            await conn.execute(delete(Job).where(Job.model == "test-states"))
        await engine.dispose()


async def test_states_guards_in_postgres_let_through_exactly_the_tables_moves(db: AsyncEngine) -> None:
    """Each pair of states, run as the UPDATE the product runs: the row moves iff the table lists it,
    and narrowing to another source state never moves it."""
    for src in JobStatus:
        for dst in JobStatus:
            async with db.begin() as conn:
                job_id = (
                    await conn.execute(
                        Job.__table__.insert()
                        .values(id=f"job_states_{src.value}_{dst.value}", model="test-states", request={})
                        .values(status=src.value)
                        .returning(Job.id)
                    )
                ).scalar_one()
                moved = (await conn.execute(move(dst, Job.id == job_id))).rowcount
                status = await conn.scalar(select(Job.status).where(Job.id == job_id))
                assert (moved == 1) == can_move(src, dst), (src, dst)
                assert status == (dst.value if can_move(src, dst) else src.value), (src, dst)
                if can_move(src, dst):
                    for other in ALLOWED:
                        if other is not src and can_move(other, dst):
                            await conn.execute(
                                Job.__table__.update().where(Job.id == job_id).values(status=src.value)
                            )
                            narrowed = await conn.execute(move(dst, Job.id == job_id, src=other))
                            assert narrowed.rowcount == 0, (src, dst, other)


async def test_states_move_each_moves_each_job_with_its_own_values_and_guard(db: AsyncEngine) -> None:
    """One UPDATE for many jobs: each matched by its id and attempt and set from its own row; a row of
    another attempt, or of a job not in the source state, moves nothing. A column NULL in every row is
    written too (Postgres would read it as text without the cast)."""
    ids = [f"job_states_each_{i}" for i in range(4)]
    async with db.begin() as conn:
        for i, job_id in enumerate(ids):
            status = JobStatus.QUEUED if i == 3 else JobStatus.RUNNING
            await conn.execute(
                Job.__table__.insert().values(
                    id=job_id, model="test-states", request={}, status=status.value, attempts=1
                )
            )
        rows = [
            {"id": ids[0], "attempts": 1, "embedding": b"\x01", "peak_batch_size": None},
            {"id": ids[1], "attempts": 1, "embedding": b"\x02", "peak_batch_size": None},
            {"id": ids[2], "attempts": 2, "embedding": b"\x03", "peak_batch_size": None},  # not its attempt
            {"id": ids[3], "attempts": 1, "embedding": b"\x04", "peak_batch_size": None},  # queued
        ]
        stmt = move_each(
            JobStatus.SUCCEEDED, rows, match=("id", "attempts"), src=JobStatus.RUNNING, finish_reason="stop"
        )
        moved = await conn.execute(stmt.returning(Job.id))
        assert sorted(moved.scalars()) == ids[:2]
        query = select(Job.id, Job.status, Job.embedding, Job.finish_reason).where(Job.id.in_(ids))
        got = {row.id: row for row in await conn.execute(query)}
    assert [(got[i].status, got[i].embedding, got[i].finish_reason) for i in ids] == [
        ("succeeded", b"\x01", "stop"),
        ("succeeded", b"\x02", "stop"),
        ("running", None, None),
        ("queued", None, None),
    ]
    with pytest.raises(ForbiddenMove):
        move_each(JobStatus.SUCCEEDED, rows, src=JobStatus.QUEUED)


# What writes a job's status outside shared/transitions.py: an UPDATE of the Job model, an assignment
# to a `.status` attribute, or SQL text that updates jobs and sets status.
_SQL_SETS_STATUS = re.compile(r"UPDATE\s+jobs\b.*\bSET\b.*\bstatus\s*=", re.IGNORECASE | re.DOTALL)


def _status_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "update" and isinstance(node.args[0], ast.Name) and node.args[0].id == "Job":
                found.append(f"{where}: update(Job)")
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr == "status":
                found.append(f"{where}: .status =")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _SQL_SETS_STATUS.search(node.value):
                found.append(f"{where}: SQL sets a job's status")
    return found


def test_states_every_status_write_goes_through_the_table() -> None:
    own = REPO / "shared" / "transitions.py"
    sources = [p for d in ("api", "worker", "shared") for p in sorted((REPO / d).rglob("*.py")) if p != own]
    assert len(sources) > 50
    writes = [w for p in sources for w in _status_writes(p)]
    assert not writes, "job status written outside shared.transitions.move:\n" + "\n".join(writes)
    # The scan does find them: the one module allowed to write them does.
    assert _status_writes(own)
