"""The worker's event batcher on a real Redis: with a coalescing window a job's tokens from consecutive
steps become one event (same text, consecutive indexes), a flush never waits for the window, and
without a window (the default) every token is its own event."""

from __future__ import annotations

import asyncio
import secrets
import time

from redis.asyncio import Redis

from shared import keys
from shared.events import CHOICE, EventWriter, read_events, text_of
from shared.logprobs import LOGPROBS
from worker.publisher import EventBatcher


def _batcher(redis: Redis, coalesce: float) -> EventBatcher:
    batcher = EventBatcher(EventWriter(redis, maxlen=1000, ttl_seconds=60), coalesce_seconds=coalesce)
    batcher.start()
    return batcher


async def test_coalesce_tokens_of_consecutive_steps_become_one_event(redis: Redis) -> None:
    job = f"job_{secrets.token_hex(8)}"
    batcher = _batcher(redis, 0.05)
    try:
        batcher.emit(job, "status", {"status": "running"})
        for i, piece in enumerate(["The", " capital", " of", " France"]):
            batcher.emit(job, "token", {"index": i, "text": piece})
            await asyncio.sleep(0.005)  # engine steps 5 ms apart: inside the window
        await asyncio.sleep(0.15)  # the window closes, the event goes out
        batcher.emit(job, "token", {"index": 4, "text": " is"})
        batcher.emit(job, "done", {"finish_reason": "stop"})
        await batcher.flush(job)
    finally:
        await batcher.stop()
    events = await read_events(redis, job)
    assert [e.event for e in events] == ["status", "token", "token", "done"]
    assert [e.data["index"] for e in events if e.event == "token"] == [0, 1]
    assert text_of(events) == "The capital of France is"
    await redis.delete(keys.events_stream(job))


async def test_coalesce_off_writes_every_token(redis: Redis) -> None:
    job = f"job_{secrets.token_hex(8)}"
    batcher = _batcher(redis, 0.0)
    try:
        for i in range(5):
            batcher.emit(job, "token", {"index": i, "text": "x"})
            await asyncio.sleep(0.005)
        await batcher.flush(job)
    finally:
        await batcher.stop()
    events = await read_events(redis, job)
    assert [e.data["index"] for e in events] == [0, 1, 2, 3, 4]
    await redis.delete(keys.events_stream(job))


async def test_coalesce_flush_does_not_wait_for_the_window(redis: Redis) -> None:
    job = f"job_{secrets.token_hex(8)}"
    batcher = _batcher(redis, 5.0)
    try:
        batcher.emit(job, "token", {"index": 0, "text": "a"})
        batcher.emit(job, "token", {"index": 1, "text": "b"})
        t0 = time.monotonic()
        await asyncio.wait_for(batcher.flush(job), 2.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        await batcher.stop()
    events = await read_events(redis, job)
    assert [(e.data["index"], e.data["text"]) for e in events] == [(0, "ab")]
    await redis.delete(keys.events_stream(job))


async def test_coalesce_keeps_outputs_apart_and_joins_their_logprobs(redis: Redis) -> None:
    job = f"job_{secrets.token_hex(8)}"
    batcher = _batcher(redis, 0.05)

    def lp(token: str) -> dict[str, object]:
        return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}

    try:
        steps = [(0, "A"), (0, "B"), (1, "x"), (1, "y"), (0, "C")]
        for i, (choice, piece) in enumerate(steps):
            batcher.emit(job, "token", {"index": i, "text": piece, CHOICE: choice, LOGPROBS: [lp(piece)]})
        batcher.emit(job, "done", {"finish_reason": "stop"})
        await batcher.flush(job)
    finally:
        await batcher.stop()
    tokens = [e.data for e in await read_events(redis, job) if e.event == "token"]
    # Only consecutive events of one output join: the other output's text never mixes in.
    assert [(t[CHOICE], t["text"]) for t in tokens] == [(0, "AB"), (1, "xy"), (0, "C")]
    assert [t["index"] for t in tokens] == [0, 1, 2]
    assert [[e["token"] for e in t[LOGPROBS]] for t in tokens] == [["A", "B"], ["x", "y"], ["C"]]
    assert (
        text_of(await read_events(redis, job), 0) == "ABC"
        and text_of(await read_events(redis, job), 1) == "xy"
    )
    await redis.delete(keys.events_stream(job))
