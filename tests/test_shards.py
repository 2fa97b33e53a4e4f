"""Job events on a three-shard Valkey Cluster (`INFERQ_EVENTS__REDIS_URL`), the queue on a Redis of its
own: three `valkey-server` processes with the 16,384 slots split between them. The whole life cycle runs
on it (submit, SSE with resume, cancels, a batch, a worker killed and its job reclaimed, two API
processes relaying each other's jobs), the events land on every shard, a shard's primary restarted in
the middle of a stream leaves the other shards' streams untouched, a slot moved to another shard in the
middle of a stream (MIGRATING, ASK, then MOVED) loses nothing, and no CROSSSLOT, MOVED or ASK
error reaches a client or a log."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import signal
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from sqlalchemy import make_url

from inferq import embedded
from inferq.embedded import ValkeyCluster, valkey_cluster
from shared import keys
from shared.settings import QueueSettings
from tests.conftest import (
    Proc,
    Servers,
    Stack,
    _admin,
    launch,
    start_api,
)
from tests.helpers import (
    FRANCE,
    STORY,
    SseEvent,
    iter_sse,
    read_sse,
    submit,
    tokens_text,
    wait_job,
    wait_status,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUEUES = QueueSettings()
REDIRECT_OR_CROSSSLOT = re.compile(r"CROSSSLOT|MOVED|\bASK\b|TRYAGAIN")
SEEN: list[str] = []  # every response body and SSE event the tests got, checked for redirects at the end


@pytest.fixture(scope="module")
def shards() -> Iterator[ValkeyCluster]:
    with (
        tempfile.TemporaryDirectory(prefix="inferq-shards-") as root,
        valkey_cluster(Path(root), 3) as cluster,
    ):
        yield cluster


@pytest.fixture(scope="module")
def shard_stack(
    servers: Servers, model_dir: Path, shards: ValkeyCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name = f"inferq_shards_{secrets.token_hex(4)}"
    asyncio.run(_admin(servers.database_url, f'CREATE DATABASE "{name}"'))
    database_url = make_url(servers.database_url).set(database=name).render_as_string(hide_password=False)
    stack = None
    try:
        with embedded.valkey(None) as queue_url:  # the queue's own Redis, plain
            stack = launch(
                Servers(queue_url, database_url),
                model_dir,
                tmp_path_factory.mktemp("shard-logs"),
                max_batch=8,
                INFERQ_EVENTS__REDIS_URL=shards.url,
                INFERQ_BATCHES__TICK_SECONDS="0.1",
                INFERQ_WORKER__DRAIN_SECONDS="0",
                INFERQ_MAX_QUEUE_SECONDS="100000",
                INFERQ_EXTRA_MODELS=json.dumps({"unserved": str(model_dir)}),
            )
            yield stack
    finally:
        if stack is not None:
            stack.stop()
        asyncio.run(_admin(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def second_api(shard_stack: Stack) -> Iterator[tuple[str, Proc]]:
    url, proc = start_api(shard_stack)
    try:
        yield url, proc
    finally:
        proc.stop()


@pytest.fixture
async def sc(shard_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shard_stack.base_url, timeout=httpx.Timeout(30.0)) as c:
        yield c


def _shard(shards: ValkeyCluster, job_id: str) -> int:
    return shards.shard_of(keys.events_stream(job_id))


async def _events(client: httpx.AsyncClient, job_id: str, **kw: Any) -> list[SseEvent]:
    events = await read_sse(client, job_id, **kw)
    SEEN.extend(json.dumps(e.data) for e in events)
    return events


async def test_shards_stream_resumes_with_last_event_id(sc: httpx.AsyncClient) -> None:
    created = await submit(sc, messages=FRANCE, max_tokens=24, temperature=0)
    first: list[SseEvent] = []
    async for event in iter_sse(sc, created["id"]):
        first.append(event)
        if len([e for e in first if e.event == "token"]) == 3:
            break  # the client goes away mid-stream
    rest = await _events(sc, created["id"], headers={"Last-Event-ID": str(first[-1].id)})
    done = await wait_job(sc, created["id"], timeout=60)
    ids = [e.id for e in first + rest]
    assert ids == list(range(1, len(ids) + 1))  # no gap, nothing twice
    assert rest[-1].event == "done" and done["status"] == "succeeded"
    assert tokens_text(first + rest) == done["output"]


async def test_shards_two_api_processes_relay_each_others_jobs(
    sc: httpx.AsyncClient, second_api: tuple[str, Proc]
) -> None:
    async with httpx.AsyncClient(base_url=second_api[0], timeout=httpx.Timeout(30.0)) as other:
        jobs = [
            await submit(sc, messages=FRANCE, max_tokens=16),
            await submit(other, messages=FRANCE, max_tokens=16),
        ]
        # Each job's live events are read through the API process it was not submitted to.
        streams = await asyncio.gather(_events(other, jobs[0]["id"]), _events(sc, jobs[1]["id"]))
        for job, events in zip(jobs, streams, strict=True):
            done = await wait_job(sc, job["id"])
            assert events[-1].event == "done" and tokens_text(events) == done["output"]


async def test_shards_cancel_queued_and_running_jobs(sc: httpx.AsyncClient, shard_stack: Stack) -> None:
    queued = await submit(sc, model="unserved", prompt="Hi", max_tokens=4)
    resp = await sc.post(f"/v1/jobs/{queued['id']}/cancel")
    SEEN.append(resp.text)
    assert resp.json()["status"] == "cancelled"
    assert (await _events(sc, queued["id"]))[-1].data["finish_reason"] == "cancelled"

    running = await submit(sc, messages=STORY, max_tokens=400)
    await wait_status(sc, running["id"], "running")
    resp = await sc.post(f"/v1/jobs/{running['id']}/cancel")
    SEEN.append(resp.text)
    job = await wait_job(sc, running["id"])
    assert job["status"] == "cancelled" and job["usage"]["completion_tokens"] < 400
    events = await _events(sc, running["id"])
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "cancelled"


async def test_shards_batch_completes(shard_stack: Stack) -> None:
    oai = AsyncOpenAI(base_url=shard_stack.base_url + "/v1", api_key="unused")
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "SmolLM2-135M-Instruct", "messages": FRANCE, "max_tokens": 4, "temperature": 0},
        }
        for i in range(4)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = await oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await oai.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        batch = await oai.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 4
    assert batch.output_file_id is not None
    output = (await oai.files.content(batch.output_file_id)).text
    SEEN.append(output)
    assert len(output.splitlines()) == 4
    await oai.close()


async def test_shards_killed_worker_job_is_reclaimed(sc: httpx.AsyncClient, shard_stack: Stack) -> None:
    created = await submit(sc, messages=STORY, max_tokens=60, temperature=0)
    await wait_status(sc, created["id"], "running")
    await asyncio.sleep(0.5)  # some tokens out
    worker = shard_stack.worker
    worker.send(signal.SIGKILL)
    await asyncio.to_thread(worker.popen.wait)  # type: ignore[union-attr]
    worker.start()
    done = await wait_job(sc, created["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    events = await _events(sc, created["id"])
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert any(e.event == "status" and e.data.get("reason") == "worker_lost" for e in events)
    assert tokens_text_resumed(events) == done["output"]


def tokens_text_resumed(events: list[SseEvent]) -> str:
    """The text a client that followed the whole stream shows (a retried attempt continues its text)."""
    from shared.events import Event, text_of

    return text_of([Event(e.id, e.event, e.data) for e in events])


async def _timed(client: httpx.AsyncClient, job_id: str, out: list[tuple[float, SseEvent]]) -> None:
    async for event in iter_sse(client, job_id):
        out.append((time.monotonic(), event))
        SEEN.append(json.dumps(event.data))


async def test_shards_primary_restart_mid_stream(
    sc: httpx.AsyncClient, shards: ValkeyCluster, shard_stack: Stack
) -> None:
    on: dict[int, dict[str, Any]] = {}
    spare = []
    while len(on) < 2:
        job = await submit(sc, messages=STORY, max_tokens=48, temperature=0)
        if _shard(shards, job["id"]) in on:
            spare.append(job)
        else:
            on[_shard(shards, job["id"])] = job
        assert len(spare) < 12
    for job in spare:  # only the two streams watched take the engine
        await sc.post(f"/v1/jobs/{job['id']}/cancel")
    (victim_shard, victim), (_, bystander) = list(on.items())
    seen: dict[str, list[tuple[float, SseEvent]]] = {victim["id"]: [], bystander["id"]: []}
    readers = [asyncio.create_task(_timed(sc, job_id, out)) for job_id, out in seen.items()]
    deadline = time.monotonic() + 300
    while min(sum(e.event == "token" for _, e in out) for out in seen.values()) < 3:
        assert time.monotonic() < deadline and not any(r.done() for r in readers)
        await asyncio.sleep(0.05)
    down_at = time.monotonic()
    await asyncio.to_thread(shards.restart, victim_shard, 2.0)
    up_at = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*readers), 400)

    for job_id, out in seen.items():
        done = await wait_job(sc, job_id)
        events = [e for _, e in out]
        assert [e.id for e in events] == list(range(1, len(events) + 1)), job_id  # no gap, nothing twice
        assert events[-1].event == "done" and tokens_text(events) == done["output"]

    def gaps(out: list[tuple[float, SseEvent]], inside: bool) -> list[float]:
        times = [t for t, e in out if e.event == "token"]
        pairs = zip(times, times[1:], strict=False)
        return [b - a for a, b in pairs if (down_at <= b and a <= up_at) == inside]

    # The victim's stream stood still while its shard was down (then caught up from the stream); the
    # bystander's tokens kept coming during the outage. (How evenly depends on the engine's pace on a
    # machine shared with other work, so the bound on its gaps is loose; the logs below are exact.)
    assert max(gaps(seen[victim["id"]], inside=True)) >= 1.5
    during, elsewhere = gaps(seen[bystander["id"]], True), gaps(seen[bystander["id"]], False)
    assert during and elsewhere
    pace = statistics.median(elsewhere)
    assert max(during) < max(3.0, 5 * pace), (max(during), pace)
    # Only the restarted shard was ever failed to, by the worker's writer and by the API's relay.
    victim_node = f"127.0.0.1:{shards.ports[victim_shard]}"
    failed_to = set()
    for path in shard_stack.api.log_dir.glob("*.log"):
        text = path.read_text(errors="replace")
        failed_to |= set(re.findall(r"publishing events of \d+ job\(s\) to (\S+) failed", text))
        failed_to |= set(re.findall(r"relay lost its connection to shard (\S+) ", text))
    assert failed_to == {victim_node}, failed_to


def _migrate_slot(shards: ValkeyCluster, slot: int, src: int, dst: int, pause: float) -> None:
    """Move one slot between shards the way a resharding does (IMPORTING/MIGRATING, MIGRATE the keys,
    SETSLOT NODE on every node), pausing in each phase while the job's events keep coming."""
    a, b = shards.client(src), shards.client(dst)
    a_id = a.execute_command("CLUSTER MYID").decode()  # type: ignore[no-untyped-call]
    b_id = b.execute_command("CLUSTER MYID").decode()  # type: ignore[no-untyped-call]
    b.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", a_id)  # type: ignore[no-untyped-call]
    a.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", b_id)  # type: ignore[no-untyped-call]
    time.sleep(pause)  # still on the source: served there
    while moving := a.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):  # type: ignore[no-untyped-call]
        a.execute_command(  # type: ignore[no-untyped-call]
            "MIGRATE", "127.0.0.1", shards.ports[dst], "", 0, 5000, "KEYS", *moving
        )
    time.sleep(pause)  # the stream on the target, the slot still the source's: ASK
    for i in range(len(shards.nodes)):
        r = shards.client(i)
        r.execute_command("CLUSTER SETSLOT", slot, "NODE", b_id)  # type: ignore[no-untyped-call]
        r.close()
    a.close()
    b.close()


async def test_shards_slot_moved_mid_stream(sc: httpx.AsyncClient, shards: ValkeyCluster) -> None:
    from redis.crc import key_slot

    job = await submit(sc, messages=STORY, max_tokens=40, temperature=0)
    stream = keys.events_stream(job["id"])
    src = _shard(shards, job["id"])
    dst = (src + 1) % 3
    out: list[tuple[float, SseEvent]] = []
    reader = asyncio.create_task(_timed(sc, job["id"], out))
    deadline = time.monotonic() + 300
    while sum(e.event == "token" for _, e in out) < 3:
        assert time.monotonic() < deadline and not reader.done()
        await asyncio.sleep(0.05)
    await asyncio.to_thread(_migrate_slot, shards, key_slot(stream.encode()), src, dst, 1.0)
    await asyncio.wait_for(reader, 400)
    done = await wait_job(sc, job["id"])
    events = [e for _, e in out]
    assert [e.id for e in events] == list(range(1, len(events) + 1))  # no gap, nothing twice
    assert events[-1].event == "done" and tokens_text(events) == done["output"]
    slot = key_slot(stream.encode())
    assert shards.client(dst).exists(stream)  # the stream lives on its new shard now, nothing on the old
    assert shards.client(src).execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0  # type: ignore[no-untyped-call]


async def test_shards_events_land_on_every_shard(sc: httpx.AsyncClient, shards: ValkeyCluster) -> None:
    def streams_per_shard() -> list[int]:
        counts = []
        for i in range(3):
            r = shards.client(i)
            counts.append(sum(1 for _ in r.scan_iter(match=keys.events_stream("*"), count=1000)))
            r.close()
        return counts

    for _ in range(30):
        if all(streams_per_shard()):
            break
        created = await submit(sc, messages=FRANCE, max_tokens=2, temperature=0)
        await wait_job(sc, created["id"])
    assert all(streams_per_shard()), streams_per_shard()
    assert all(shards.dbsize())
    # The queue's keys live on the queue's Redis, never on the cluster.
    for i in range(3):
        r = shards.client(i)
        assert not list(r.scan_iter(match=keys.QUEUE_TAG + "*")), i
        r.close()


async def test_shards_no_redirect_or_crossslot_reached_a_client_or_a_log(
    shard_stack: Stack, second_api: tuple[str, Proc]
) -> None:
    for text in SEEN:
        assert not REDIRECT_OR_CROSSSLOT.search(text), text
    logs = sorted(shard_stack.api.log_dir.glob("*.log"))
    assert len(logs) >= 4  # the API, the second API, the worker and its restart
    for path in logs:
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text(errors="replace").splitlines():
                assert not REDIRECT_OR_CROSSSLOT.search(line), f"{path.name}: {line}"
