"""Job events: how they are written to Redis (stream + live channel) and read back.

Each event is appended to the job's capped stream with the explicit id `0-<seq>` (Redis assigns
the next seq atomically with `0-*`) and published on the job's live channel, in one script call.
Readers subscribe to the channel first, then read the stream, and drop any seq they have seen.
On a Redis Cluster the channel is a sharded one (`SPUBLISH`, in the stream's slot): a message travels
to the subscribers of its own shard only, where `PUBLISH` would be copied to every node of the cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import AskError, NoScriptError, ResponseError

from shared import keys
from shared.eventredis import REDIRECTS, ClusterTopology, EventsRedis, NodeLinks
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

# Every event is written with the attempt it belongs to (ARGV[6]; 0: written by the API, no attempt's),
# and each entry keeps the highest attempt seen so far (field `a`): an event of an older attempt than
# that (a worker that was frozen, lost its job to another and woke up) is dropped, as is any event after
# the job's end (`done` or `error`). A dropped event returns seq 0, which XADD never gives.
_FENCE_LUA = """
local fence = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local f = last[2]
  for i = 1, #f, 2 do
    if f[i] == 'e' and (f[i + 1] == 'done' or f[i + 1] == 'error') then return 0 end
    if f[i] == 'a' then fence = tonumber(f[i + 1]) end
  end
end
local attempt = tonumber(ARGV[6])
if attempt > 0 and attempt < fence then return 0 end
if attempt > fence then fence = attempt end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-*', 'e', ARGV[3], 'd', ARGV[4], 'a', fence)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local seq = string.sub(id, 3)
"""
_PUBLISH_LUA = (
    _FENCE_LUA
    + """redis.call('PUBLISH', ARGV[5], seq .. '|' .. ARGV[3] .. '|' .. ARGV[4])
return seq
"""
)

# The cluster's variant: a sharded channel in the stream's slot, so the server routes and checks it
# with the stream. It travels as an argument: declared as a key it would count as a missing key while
# its slot is being migrated, and every event of the slot would fail with TRYAGAIN until the end.
_SPUBLISH_LUA = (
    _FENCE_LUA
    + """redis.call('SPUBLISH', ARGV[5], seq .. '|' .. ARGV[3] .. '|' .. ARGV[4])
return seq
"""
)
FENCED = 0  # the seq of an event that was dropped (an older attempt's, or after the job's end)


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


# (job id, event, data, attempt): the attempt of the job that writes it, 0 for an event the API writes.
Item = tuple[str, EventType, dict[str, Any], int]
_REDIRECT_TRIES = 3


class EventWriter:
    """Appends events to job streams; many events go out in one pipelined round trip per shard."""

    def __init__(self, redis: EventsRedis, *, maxlen: int, ttl_seconds: int) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._ttl_ms = ttl_seconds * 1000
        self._topology: ClusterTopology | None = None
        self._links: NodeLinks | None = None
        if isinstance(redis, RedisCluster):
            self._topology = ClusterTopology(redis)
            self._links = NodeLinks(self._topology)
        self._lua = _PUBLISH_LUA if self._topology is None else _SPUBLISH_LUA
        self._sha = hashlib.sha1(self._lua.encode()).hexdigest()

    @property
    def sharded(self) -> bool:
        return self._topology is not None

    def route(self, job_id: str) -> str:
        """The shard a job's events go to ("" on a plain Redis): writes to different shards are
        independent, so one that is slow or away holds up only its own jobs."""
        if self._topology is None:
            return ""
        try:
            return str(self._topology.node(keys.events_stream(job_id)).name)
        except Exception:  # slot not covered right now: its own lane, retried after a lookup
            return "?"

    def _args(self, job_id: str, event: str, data: dict[str, Any], attempt: int) -> tuple[Any, ...]:
        return (
            "EVALSHA",
            self._sha,
            1,
            keys.events_stream(job_id),
            self._maxlen,
            self._ttl_ms,
            event,
            dumps(data),
            keys.live_channel(job_id),
            attempt,
        )

    async def publish(self, job_id: str, event: EventType, data: dict[str, Any], *, attempt: int = 0) -> int:
        """One event; its seq, or FENCED if it was dropped (see _FENCE_LUA)."""
        return (await self.publish_many([(job_id, event, data, attempt)]))[0]

    async def publish_many(self, items: list[Item]) -> list[int]:
        """One round trip per shard for all items; raises the first error any item got."""
        results = await self.publish_each(items)
        seqs: list[int] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            seqs.append(r)
        return seqs

    async def publish_each(self, items: Sequence[Item]) -> list[int | BaseException]:
        """Each item's seq, or the error it got. A job's items that fail are a suffix of its items
        (nothing of a job is written after one of its events failed), so trying them again in order
        keeps its stream in order."""
        if not items:
            return []
        if self._topology is None:
            return await self._plain(items)
        return await self._sharded(items)

    async def _plain(self, items: Sequence[Item]) -> list[int | BaseException]:
        assert isinstance(self._redis, Redis)
        results: list[Any] = []
        for _ in range(2):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for item in items:
                        pipe.execute_command(*self._args(*item))
                    results = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the connection: no reply to any of them
                return [exc] * len(items)
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            await self._redis.script_load(self._lua)
        return [r if isinstance(r, BaseException) else int(r) for r in results]

    async def _sharded(self, items: Sequence[Item]) -> list[int | BaseException]:
        assert self._topology is not None and self._links is not None
        results: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(_REDIRECT_TRIES):
            by_node: dict[str, tuple[Any, list[int]]] = {}
            for i in todo:
                try:
                    node = self._topology.node(keys.events_stream(items[i][0]))
                except Exception as exc:
                    results[i] = exc
                    continue
                by_node.setdefault(node.name, (node, []))[1].append(i)
            await asyncio.gather(*(self._send(node, idx, items, results) for node, idx in by_node.values()))
            await self._follow_asks([i for i in todo if isinstance(results[i], AskError)], items, results)
            redirected = [i for i in todo if isinstance(results[i], REDIRECTS)]
            if not redirected or attempt == _REDIRECT_TRIES - 1:
                break
            # The slot map is stale (a slot moved, a replica took over): look it up, send again. These
            # commands did not run where they went, so sending them again writes each event once.
            await self._topology.refresh()
            todo = redirected
        if any(isinstance(r, Exception) and not isinstance(r, ResponseError) for r in results):
            # A node that went away may have been replaced: the next try looks it up anew.
            asyncio.get_running_loop().create_task(self._topology.refresh())
        return _suffix_failures(items, results)

    async def _send(
        self, node: Any, idx: list[int], items: Sequence[Item], results: list[Any], *, asking: bool = False
    ) -> None:
        assert self._links is not None
        commands: list[tuple[Any, ...]] = []
        for i in idx:
            if asking:
                commands.append(("ASKING",))
            commands.append(self._args(*items[i]))
        replies = await self._links.pipeline(node, commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            # A node that restarted (or a new primary) has lost its script cache; none of these ran.
            await self._links.pipeline(node, [("SCRIPT", "LOAD", self._lua)])
            replies = await self._links.pipeline(node, commands)
        if asking:
            replies = replies[1::2]
        for i, reply in zip(idx, replies, strict=True):
            results[i] = reply if isinstance(reply, BaseException) else int(reply)

    async def _follow_asks(self, asked: list[int], items: Sequence[Item], results: list[Any]) -> None:
        """Events of a slot being migrated whose stream has moved already: sent, in order, to the node
        the slot is moving to, each after ASKING (the slot map still names the old node until the end)."""
        assert self._topology is not None
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i in asked:
            err = results[i]
            node = self._topology.cluster.get_node(host=err.host, port=err.port)
            if node is not None:
                by_node.setdefault(node.name, (node, []))[1].append(i)
        await asyncio.gather(
            *(self._send(node, idx, items, results, asking=True) for node, idx in by_node.values())
        )

    async def aclose(self) -> None:
        if self._links is not None:
            await self._links.aclose()


def _suffix_failures(items: Sequence[Item], results: list[Any]) -> list[int | BaseException]:
    """After a job's first failed event, its later ones count as failed too. They fail together anyway
    (one slot, one node, one connection); this keeps it so should a later one ever get through, since
    the caller sends a job's failed events again in order and its stream must stay in order."""
    failed: dict[str, BaseException] = {}
    out: list[int | BaseException] = []
    for (job_id, *_), r in zip(items, results, strict=True):
        if job_id in failed:
            out.append(failed[job_id])
        elif isinstance(r, BaseException):
            failed[job_id] = r
            out.append(r)
        else:
            out.append(r)
    return out


async def read_events(
    redis: EventsRedis, job_id: str, after: int = 0, count: int | None = None
) -> list[Event]:
    """Events of a job with seq > `after`, oldest first."""
    entries = await redis.xrange(keys.events_stream(job_id), min=f"(0-{after}", max="+", count=count)
    return [Event.from_stream_entry(eid, fields) for eid, fields in entries]


async def last_event(redis: EventsRedis, job_id: str) -> Event | None:
    """The newest event of a job's stream, if the stream is there."""
    entries = await redis.xrevrange(keys.events_stream(job_id), count=1)
    return Event.from_stream_entry(*entries[0]) if entries else None
