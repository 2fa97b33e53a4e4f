"""Submission rate of one inferq API process: `POST /v1/jobs` (tokenize, INSERT + commit in Postgres,
enqueue in Redis) at 64 concurrent clients, no worker running, next to a bare FastAPI "hello" route on
the same machine with the same client and concurrency.

    python -m bench submit [--concurrency 64] [--seconds 10] [--warmup 2] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

from bench import aio, loadgen, profiling
from bench.harness import demo_model, running_stack
from bench.machine import (
    CpuByProcess,
    CpuMeter,
    add_quiet_arguments,
    clean_options,
    describe,
    other_cores,
    run_clean,
    stack_markers,
)
from bench.procs import free_port, server
from bench.stats import write_json
from shared.db import create_engine

JOB = {"messages": [{"role": "user", "content": "Say hello in French."}], "max_tokens": 16}


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(
    url: str,
    path: str,
    expect: int,
    args: argparse.Namespace,
    pids: dict[str, int],
    markers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The closed-loop load on `path`; success is HTTP status `expect`."""
    call = loadgen.Call("POST", path, JOB, expect)
    run = loadgen.run_for(
        url, call, concurrency=args.concurrency, seconds=args.seconds, warmup=args.warmup, client=args.client
    )
    meter, by_process = CpuMeter().start(), CpuByProcess(pids, markers).start()
    cpu0, t0 = _cpu_self(), time.perf_counter()
    res = aio.run(run)
    wall = time.perf_counter() - t0
    out = res.summary()
    out["machine_busy"] = meter.busy()
    out["cpu_cores_by_process"] = by_process.cores()
    out["client_cpu_cores"] = round((_cpu_self() - cpu0) / wall, 2)
    return out


def _clean(redis_url: str, database_url: str) -> dict[str, int]:
    """How many jobs were stored and queued; then empty the queue and the jobs table."""
    with redis.Redis.from_url(redis_url) as r:
        queued = sum(int(r.zcard(k)) for k in r.scan_iter(match="{inferq}:queue:*") if r.type(k) == b"zset")
        r.flushdb()

    async def truncate() -> int:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.begin() as conn:
                stored = int((await conn.execute(text("SELECT count(*) FROM jobs"))).scalar_one())
                await conn.execute(text("TRUNCATE jobs CASCADE"))
        finally:
            await engine.dispose()
        return stored

    return {"jobs_in_postgres": asyncio.run(truncate()), "jobs_in_redis_queue": queued}


def run_inferq(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    env = {"INFERQ_AUTH": "off", "INFERQ_MAX_QUEUE_SECONDS": "1000000000"}
    with running_stack(model_dir, worker=False, log_dir=args.log_dir, extra_env=env) as stack:
        markers = stack_markers(stack.redis_url, stack.database_url)

        def attempt() -> dict[str, Any]:
            pids = {"api": stack.api_pid} if args.profile else {}
            with profiling.recording_all(pids, args.log_dir, "submit") as recs:
                out = measure(stack.base_url, "/v1/jobs", 202, args, {"inferq api": stack.api_pid}, markers)
            for name, raw in recs.items():
                out.setdefault("profiles", {})[name] = summary = profiling.summarize(raw)
                profiling.print_summary(f"inferq {name} under submit load", summary)
            out.update(_clean(stack.redis_url, stack.database_url))  # every attempt starts from empty
            return out

        out, out["clean"] = run_clean(attempt, other_cores, **clean_options(args))
    return out


def run_hello(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bench.hello_server", "--port", str(port)]

    def ready() -> bool:
        return httpx.get(f"{url}/hello", timeout=1).status_code == 200

    with server(cmd, ready=ready, log=args.log_dir / "hello.log", what="hello server") as proc:
        out, out["clean"] = run_clean(
            lambda: measure(url, "/hello", 200, args, {"hello server": proc.pid}),
            other_cores,
            **clean_options(args),
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured window.")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--client", choices=loadgen.CLIENTS, default="raw", help="Load generator client.")
    parser.add_argument("--profile", action="store_true", help="py-spy the API process meanwhile.")
    add_quiet_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = demo_model()
    print(f"submit: inferq POST /v1/jobs, {args.concurrency} clients, {args.seconds:.0f} s…", flush=True)
    ours = run_inferq(args, model_dir)
    print(f"submit: bare FastAPI hello, {args.concurrency} clients, {args.seconds:.0f} s…", flush=True)
    hello = run_hello(args)
    result = {
        "benchmark": "submit",
        "machine": describe(),
        "inferq_submit": ours,
        "fastapi_hello": hello,
        "ratio_vs_hello": round(ours["req_per_s"] / hello["req_per_s"], 3) if hello["req_per_s"] else None,
    }
    for name, r in (("inferq POST /v1/jobs", ours), ("FastAPI hello", hello)):
        lat = r["latency_ms"]
        print(
            f"  {name:<22} {r['req_per_s']:>8.1f} req/s  p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
            f"errors {r['errors']}  machine {r['machine_busy']:.0%} busy"
        )
        print(f"    CPU cores by process: {r['cpu_cores_by_process']}")
    print(f"  ratio inferq / hello: {result['ratio_vs_hello']}")
    write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench submit", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
