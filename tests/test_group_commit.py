"""worker.group_commit: the embedding worker's claims and result writes. Calls that arrive while a round
runs go together in the next round; a lone call runs at once; a round's failure is its callers' only."""

from __future__ import annotations

import asyncio

import pytest

from worker.group_commit import GroupCommit


async def test_group_commit_calls_during_a_round_share_the_next_round() -> None:
    rounds: list[list[int]] = []
    started, gate = asyncio.Event(), asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        rounds.append(list(items))
        started.set()
        await gate.wait()
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(run)
    first = asyncio.create_task(group(1))
    await started.wait()  # the lone call's round runs at once, with it alone
    others = [asyncio.create_task(group(i)) for i in (2, 3, 4)]
    gate.set()
    assert await asyncio.gather(first, *others) == [10, 20, 30, 40]
    assert rounds == [[1], [2, 3, 4]]


async def test_group_commit_a_failed_round_fails_its_callers_only() -> None:
    started, gate = asyncio.Event(), asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        started.set()
        await gate.wait()
        if 1 in items:
            raise ValueError("round of 1")
        return items

    group: GroupCommit[int, int] = GroupCommit(run)
    first = asyncio.create_task(group(1))
    await started.wait()
    second = asyncio.create_task(group(2))
    gate.set()
    with pytest.raises(ValueError, match="round of 1"):
        await first
    assert await second == 2
