"""Attempt fencing on a real Redis: a worker that was frozen long enough to lose its job, and woke up,
cannot add its stale attempt's tokens to the job's stream once the job was handed back or a newer
attempt started, nor anything after the job's end; it is told, and stops generating the job."""

from __future__ import annotations

import asyncio
import secrets

from redis.asyncio import Redis

from shared.events import FENCED, RESUME_FROM, EventWriter, read_events, text_of
from worker.publisher import EventBatcher


def _writer(redis: Redis) -> EventWriter:
    return EventWriter(redis, maxlen=1000, ttl_seconds=60)


async def test_fence_drops_a_lost_attempts_late_tokens_and_everything_after_the_end(redis: Redis) -> None:
    job = f"job_{secrets.token_hex(8)}"
    old, new, api = _writer(redis), _writer(redis), _writer(redis)

    assert await old.publish(job, "status", {"status": "running", RESUME_FROM: 0}, attempt=1) == 1
    assert await old.publish(job, "token", {"index": 0, "text": "Par"}, attempt=1) == 2
    # The reaper hands the job back: from now on attempt 1's events are dropped.
    assert await api.publish(job, "status", {"status": "queued", "attempt": 1}, attempt=2) == 3
    assert await old.publish(job, "token", {"index": 1, "text": "ROT"}, attempt=1) == FENCED
    # The new attempt continues from the published text; the old one, awake, still cannot write.
    assert await new.publish(job, "status", {"status": "running", RESUME_FROM: 3}, attempt=2) == 4
    assert await old.publish(job, "token", {"index": 1, "text": "TEN"}, attempt=1) == FENCED
    assert await new.publish(job, "token", {"index": 1, "text": "is"}, attempt=2) == 5
    assert await old.publish(job, "done", {"finish_reason": "stop"}, attempt=1) == FENCED
    assert await new.publish(job, "done", {"finish_reason": "stop"}, attempt=2) == 6
    # After the end nothing is added, whoever writes it (a late deadline or cancel included).
    assert await new.publish(job, "token", {"index": 2, "text": "!"}, attempt=2) == FENCED
    assert await api.publish(job, "error", {"type": "worker_lost", "message": "x"}) == FENCED

    events = await read_events(redis, job)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert text_of(events) == "Paris"


async def test_fence_keeps_api_events_and_a_newer_attempt_without_a_hand_back(redis: Redis) -> None:
    """Events of no attempt (the API's) pass the fence; a newer attempt's `running` raises it even when
    no hand-back event came first (the worker's own shutdown wrote none it could send)."""
    job = f"job_{secrets.token_hex(8)}"
    worker, api = _writer(redis), _writer(redis)
    assert await api.publish(job, "status", {"status": "queued"}) == 1
    assert await worker.publish(job, "status", {"status": "running"}, attempt=1) == 2
    assert await api.publish(job, "status", {"status": "webhook"}) == 3
    assert await worker.publish(job, "token", {"index": 0, "text": "a"}, attempt=1) == 4
    assert await worker.publish(job, "status", {"status": "running", RESUME_FROM: 1}, attempt=3) == 5
    assert await worker.publish(job, "token", {"index": 1, "text": "b"}, attempt=2) == FENCED
    assert await worker.publish(job, "token", {"index": 1, "text": "c"}, attempt=3) == 6
    assert text_of(await read_events(redis, job)) == "ac"


async def test_fence_tells_the_batcher_which_attempt_to_stop(redis: Redis) -> None:
    job = f"job_{secrets.token_hex(8)}"
    told: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    batcher = EventBatcher(_writer(redis))
    batcher.on_fenced = lambda job_id, attempt: told.put_nowait((job_id, attempt))
    batcher.start()
    try:
        batcher.emit(job, "status", {"status": "running"}, attempt=1)
        batcher.emit(job, "token", {"index": 0, "text": "x"}, attempt=1)
        await batcher.flush(job)
        await _writer(redis).publish(job, "status", {"status": "queued"}, attempt=2)
        batcher.emit(job, "token", {"index": 1, "text": "y"}, attempt=1)
        batcher.emit(job, "status", {"status": "running", RESUME_FROM: 1}, attempt=2)
        batcher.emit(job, "token", {"index": 1, "text": "z"}, attempt=2)
        await batcher.flush(job)  # a dropped event counts as sent: a flush does not hang on it
        assert await asyncio.wait_for(told.get(), 5) == (job, 1)
        assert told.empty()
        assert text_of(await read_events(redis, job)) == "xz"
    finally:
        await batcher.stop()
