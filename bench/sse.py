"""SSE fan-out: one inferq API process relaying 1,000 concurrent `GET /v1/jobs/{id}/events` streams of
synthetic jobs. Job rows are inserted in Postgres as running (owned by a registered fake worker, so the
reaper leaves them alone); events are published with the project's own `EventWriter`, as a worker would,
and carry their publish time; a separate client process measures receive time - publish time.

    python -m bench sse [--streams 1000] [--events-per-stream 20] [--rate 1000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import insert, update

from bench import aio, profiling
from bench.harness import SERVED_NAME, RunningStack, demo_model, running_stack
from bench.machine import (
    CpuByProcess,
    CpuMeter,
    ProcessCpu,
    add_quiet_arguments,
    clean_options,
    describe,
    other_cores,
    run_clean,
    stack_markers,
)
from bench.procs import die_with_parent
from bench.stats import summarize, write_json
from shared import fleet
from shared.db import create_engine
from shared.events import EventWriter
from shared.models import Job, new_job_id
from shared.settings import Settings

FAKE_WORKER = "bench-sse-worker"


async def insert_jobs(database_url: str, n: int) -> list[str]:
    ids = [new_job_id() for _ in range(n)]
    rows = [
        {
            "id": i,
            "status": "running",
            "model": SERVED_NAME,
            "request": {"messages": [{"role": "user", "content": "synthetic"}], "max_tokens": 64},
            "prompt_tokens": 8,
            "attempts": 1,
            "worker_id": FAKE_WORKER,
        }
        for i in ids
    ]
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(Job), rows)
    finally:
        await engine.dispose()
    return ids


async def finish_jobs(database_url: str, ids: list[str]) -> None:
    """Mark the synthetic jobs succeeded, so that nothing (the reaper) touches them afterwards."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(update(Job).where(Job.id.in_(ids)).values(status="succeeded", output=""))
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def fake_worker(redis: Redis, n: int) -> AsyncIterator[None]:
    """A live registry entry for the worker the jobs name, so the API's reaper does not reclaim them."""

    async def beat() -> None:
        while True:
            info = {
                "id": FAKE_WORKER,
                "model": SERVED_NAME,
                "started_at": time.time(),
                "capacity": n,
                "running": n,
                "draining": False,
            }
            await fleet.register(redis, info, 5000)
            await asyncio.sleep(1.0)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fleet.deregister(redis, FAKE_WORKER)


async def publish_tokens(
    writer: EventWriter, ids: list[str], per_stream: int, rate: float, tick: float
) -> dict[str, Any]:
    """`per_stream` token events for every job, `rate` events/s in all, one pipeline (publish_many, what
    `publish` does for one event) per tick; each event's data carries its publish time `t`."""
    total = len(ids) * per_stream
    per_tick = max(1, round(rate * tick))
    sent = 0
    lag_ms: list[float] = []
    t_start = time.perf_counter()
    next_at = t_start
    while sent < total:
        now = time.perf_counter()
        if now < next_at:
            await asyncio.sleep(next_at - now)
        lag_ms.append((time.perf_counter() - next_at) * 1000)
        batch = []
        stamp = time.time()
        for k in range(sent, min(total, sent + per_tick)):
            index, job = divmod(k, len(ids))
            batch.append((ids[job], "token", {"index": index, "text": " tok", "t": stamp}, 0))
        await writer.publish_many(batch)  # type: ignore[arg-type]
        sent += len(batch)
        next_at += tick
    elapsed = time.perf_counter() - t_start
    return {
        "events": sent,
        "seconds": round(elapsed, 2),
        "events_per_s": round(sent / elapsed, 1),
        "publisher_lag_ms": summarize(lag_ms),
    }


async def _read_until(proc: asyncio.subprocess.Process, word: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the SSE client did not say {word} in {timeout:.0f} s")
        line = (await asyncio.wait_for(proc.stdout.readline(), left)).decode()
        if not line:
            raise RuntimeError(f"the SSE client exited (code {await proc.wait()}) before {word}")
        if line.startswith(word):
            return line.strip()


async def run_async(stack: RunningStack, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    ids = await insert_jobs(stack.database_url, args.streams)
    ids_file = args.log_dir / "sse-ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    out_file = args.log_dir / "sse-client.json"
    redis = Redis.from_url(stack.redis_url)
    writer = EventWriter(redis, maxlen=settings.events.stream_maxlen, ttl_seconds=settings.events.ttl_seconds)
    try:
        async with fake_worker(redis, args.streams):
            await writer.publish_many(
                [(i, "status", {"status": "running", "worker_id": FAKE_WORKER}, 0) for i in ids]
            )
            cmd = [sys.executable, "-m", "bench.sse_client", "--url", stack.base_url]
            cmd += ["--ids", str(ids_file), "--out", str(out_file)]
            log = (args.log_dir / "sse-client.log").open("wb")
            proc = await asyncio.create_subprocess_exec(
                *die_with_parent(cmd), stdout=asyncio.subprocess.PIPE, stderr=log
            )
            try:
                ready = await _read_until(proc, "READY", 300)
                print(f"  {ready.split()[1]} streams open in {ready.split()[2]} s; publishing…", flush=True)
                pids = {"api": stack.api_pid} if args.profile else {}
                with profiling.recording_all(pids, args.log_dir, "sse") as recs:
                    meter, api_cpu = CpuMeter().start(), ProcessCpu(stack.api_pid).start()
                    markers = stack_markers(stack.redis_url, stack.database_url) | {
                        "sse client": "bench.sse_client"
                    }
                    by_process = CpuByProcess({"inferq api": stack.api_pid}, markers).start()
                    published = await publish_tokens(
                        writer, ids, args.events_per_stream, args.rate, args.tick
                    )
                    await writer.publish_many(
                        [(i, "done", {"finish_reason": "length", "t": time.time()}, 0) for i in ids]
                    )
                    await _read_until(proc, "DONE", 600)
                    published["machine_busy"], published["api_cpu_cores"] = meter.busy(), api_cpu.cores()
                    published["cpu_cores_by_process"] = by_process.cores()
                await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    await proc.wait()
                log.close()
                await finish_jobs(stack.database_url, ids)
    finally:
        await redis.aclose()
    client = json.loads(out_file.read_text())
    result: dict[str, Any] = {
        "streams": client["streams"],
        "streams_done": client["done"],
        "stream_errors": client["errors"] + client["http_errors"],
        "events_received": client["tokens"],
        "added_latency_ms": summarize(client["latencies_ms"]),
        "publish": published,
    }
    for name, raw in recs.items():
        result.setdefault("profiles", {})[name] = summary = profiling.summarize(raw)
        profiling.print_summary(f"inferq {name} relaying {args.streams} streams", summary)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events-per-stream", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000.0, help="Token events per second, all streams.")
    parser.add_argument("--tick", type=float, default=0.01, help="Seconds between publish pipelines.")
    parser.add_argument("--profile", action="store_true", help="py-spy the API process meanwhile.")
    add_quiet_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = demo_model()
    print(
        f"sse: {args.streams} streams × {args.events_per_stream} token events at {args.rate:.0f} events/s…",
        flush=True,
    )
    env = {"INFERQ_AUTH": "off"}
    with running_stack(model_dir, worker=False, log_dir=args.log_dir, extra_env=env) as stack:
        measured, clean = run_clean(
            lambda: aio.run(run_async(stack, args)),
            lambda m: other_cores(m["publish"]),
            **clean_options(args),
        )
    measured["clean"] = clean
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"benchmark": "sse", "machine": describe(), "config": config}
    result.update(measured)
    lat = measured["added_latency_ms"]
    pub = measured["publish"]
    print(
        f"  {measured['streams_done']}/{measured['streams']} streams done, "
        f"{measured['events_received']} events; "
        f"added latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms max {lat['max']:.1f} ms; "
        f"published {pub['events_per_s']:.0f} events/s; API {pub['api_cpu_cores']:.2f} cores"
    )
    print(f"  CPU cores by process: {pub['cpu_cores_by_process']}")
    write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench sse", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
