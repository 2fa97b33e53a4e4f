"""The job state machine is one closed set: every state has its moves, final states have none, and
every state a job can be in reaches a final one."""

from __future__ import annotations

from shared.states import ALLOWED, TERMINAL, JobStatus, can_move


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


def test_states_expired_only_from_queued() -> None:
    # `expired` means it never ran: a running job past its deadline is cancelled (finish_reason timeout).
    assert can_move(JobStatus.QUEUED, JobStatus.EXPIRED)
    assert not can_move(JobStatus.RUNNING, JobStatus.EXPIRED)
    assert can_move(JobStatus.RUNNING, JobStatus.CANCELLED) and can_move(JobStatus.RUNNING, JobStatus.QUEUED)
