"""Job events: how they are written to Redis (stream + live channel) and read back.

Each event is appended to the job's capped stream with the explicit id `0-<seq>` (Redis assigns
the next seq atomically with `0-*`) and published on the job's live channel, in one script call.
Readers subscribe to the channel first, then read the stream, and drop any seq they have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from shared import keys
from shared.logprobs import LOGPROBS

EventType = Literal["status", "token", "done", "error"]
END_EVENTS: frozenset[str] = frozenset({"done", "error"})
# On a `running` status: how many characters of the text so far this attempt continues from. A job
# tried again after losing its worker continues from the text its earlier attempts published.
RESUME_FROM = "resume_from_chars"
# A job with n > 1 outputs: a token event's output (absent: 0); on a `running` status, each output's
# `resume_from_chars`; on `done`, each output's `{index, finish_reason}`.
CHOICE = "choice"
RESUME_FROM_BY_CHOICE = "resume_from_chars_by_choice"
CHOICES = "choices"

_PUBLISH_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-*', 'e', ARGV[3], 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local seq = string.sub(id, 3)
redis.call('PUBLISH', ARGV[5], seq .. '|' .. ARGV[3] .. '|' .. ARGV[4])
return seq
"""


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    event: str
    data: dict[str, Any]

    @property
    def is_end(self) -> bool:
        return self.event in END_EVENTS

    @classmethod
    def from_message(cls, raw: bytes | str) -> Event:
        text = raw.decode() if isinstance(raw, bytes) else raw
        seq, event, data = text.split("|", 2)
        return cls(int(seq), event, json.loads(data))

    @classmethod
    def from_stream_entry(cls, entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        ev, data = get["e"], get["d"]
        return cls(
            int(eid.split("-", 1)[1]),
            ev.decode() if isinstance(ev, bytes) else ev,
            json.loads(data),
        )


def choice_of(event: Event) -> int:
    """Which of a job's outputs a token event belongs to (0 for a job with one)."""
    return int(event.data.get(CHOICE) or 0)


def _resume_from(event: Event, choice: int) -> int:
    by_choice = event.data.get(RESUME_FROM_BY_CHOICE)
    if isinstance(by_choice, list) and choice < len(by_choice):
        return int(by_choice[choice] or 0)
    return int(event.data.get(RESUME_FROM) or 0)


def text_after(text: str, event: Event, choice: int = 0) -> str:
    """A job's text so far (of its output `choice`), after one more of its events: a token of that output
    adds its text; an attempt that starts keeps the first `resume_from_chars` characters (none when it
    starts over) and drops the rest."""
    if event.event == "token":
        return text + str(event.data["text"]) if choice_of(event) == choice else text
    if event.event == "status" and event.data.get("status") == "running":
        return text[: _resume_from(event, choice)]
    return text


def text_of(events: list[Event], choice: int = 0) -> str:
    """A job's text so far (of its output `choice`), from its events in order."""
    text = ""
    for event in events:
        text = text_after(text, event, choice)
    return text


def logprobs_of(events: list[Event], choice: int = 0) -> list[dict[str, Any]]:
    """The logprobs (shared.logprobs) of a job's text so far, from its events in order, kept as
    `text_of` keeps the text: an attempt that starts over drops them, one that continues keeps the
    tokens that fit in the characters it continues from."""
    entries: list[dict[str, Any]] = []
    for event in events:
        if event.event == "token":
            if choice_of(event) == choice:
                entries += event.data.get(LOGPROBS) or []
        elif event.event == "status" and event.data.get("status") == "running":
            keep, chars = [], _resume_from(event, choice)
            for entry in entries:
                chars -= len(entry["token"])
                if chars < 0:
                    break
                keep.append(entry)
            entries = keep
    return entries


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class EventWriter:
    """Appends events to job streams; many events go out in one pipelined round trip."""

    def __init__(self, redis: Redis, *, maxlen: int, ttl_seconds: int) -> None:
        self._redis = redis
        self._sha = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()
        self._maxlen = maxlen
        self._ttl_ms = ttl_seconds * 1000

    def _args(self, job_id: str, event: str, data: dict[str, Any]) -> tuple[Any, ...]:
        return (
            self._sha,
            1,
            keys.events_stream(job_id),
            self._maxlen,
            self._ttl_ms,
            event,
            dumps(data),
            keys.live_channel(job_id),
        )

    async def publish(self, job_id: str, event: EventType, data: dict[str, Any]) -> int:
        return (await self.publish_many([(job_id, event, data)]))[0]

    async def publish_many(self, items: list[tuple[str, EventType, dict[str, Any]]]) -> list[int]:
        """One round trip for all items (EVALSHA, loading the script once if the server lacks it)."""
        if not items:
            return []
        for _ in range(2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id, event, data in items:
                    pipe.evalsha(*self._args(job_id, event, data))
                results = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            await self._redis.script_load(_PUBLISH_LUA)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return [int(s) for s in results]


async def read_events(redis: Redis, job_id: str, after: int = 0, count: int | None = None) -> list[Event]:
    """Events of a job with seq > `after`, oldest first."""
    entries = await redis.xrange(keys.events_stream(job_id), min=f"(0-{after}", max="+", count=count)
    return [Event.from_stream_entry(eid, fields) for eid, fields in entries]


async def last_event(redis: Redis, job_id: str) -> Event | None:
    """The newest event of a job's stream, if the stream is there."""
    entries = await redis.xrevrange(keys.events_stream(job_id), count=1)
    return Event.from_stream_entry(*entries[0]) if entries else None
