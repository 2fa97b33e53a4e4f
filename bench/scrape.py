"""What the unauthenticated reads cost with a full keyspace: 1,000 scrapes of the API's `/metrics` and
10,000 polls of queued jobs (`GET /v1/jobs/{id}`), with 50,000 job event streams in Redis, against this
checkout's code ("after") and, with `--baseline DIR`, another checkout's ("before", e.g. a `git worktree`
of main), in one run. Each side gets a fresh stack (embedded Valkey and PostgreSQL, one API process, no
worker: a registry entry stands in for one, so that the jobs stay queued and their polls read the fleet).
Requests go one at a time; per request: latency p50/p99, the API process's CPU time (psutil), and the
Redis commands (all, and SCANs) and Redis CPU it caused (`INFO commandstats`, `INFO cpu`).

    python -m bench scrape [--baseline ../inferq-087942a] [--streams 50000] [--scrapes 1000]
                           [--polls 10000] [--baseline-polls 1000] [--jobs 50] [--json bench/scrape.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis.asyncio import Redis

from bench import aio
from bench.harness import SERVED_NAME, RunningStack, demo_model, running_stack
from bench.machine import describe, foreign_busy
from bench.stats import summarize, write_json
from shared import fleet, keys

HERE = Path(__file__).resolve().parent.parent
STAND_IN = "bench-scrape-worker"


async def _fill(redis: Redis, streams: int) -> None:
    """`streams` job event streams of one event each, named as the workers name them."""
    for start in range(0, streams, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 5000, streams)):
                pipe.xadd(keys.events_stream(f"job_bench{n:08d}"), {"type": "token", "data": '{"text":"x"}'})
            await pipe.execute()


async def _redis_counters(redis: Redis) -> dict[str, float]:
    stats: dict[str, Any] = await redis.info("commandstats")
    cpu: dict[str, Any] = await redis.info("cpu")
    return {
        "calls": sum(int(v["calls"]) for v in stats.values()),
        "scans": int(stats.get("cmdstat_scan", {}).get("calls", 0)),
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _measure(
    client: httpx.AsyncClient, redis: Redis, api: psutil.Process, paths: list[str], n: int
) -> dict[str, Any]:
    latencies: list[float] = []
    r0, c0, t0 = await _redis_counters(redis), _cpu_s(api), time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        resp = await client.get(paths[i % len(paths)])
        latencies.append((time.perf_counter() - start) * 1000)
        assert resp.status_code == 200, resp.text
    elapsed, c1, r1 = time.perf_counter() - t0, _cpu_s(api), await _redis_counters(redis)
    # The counters' own INFO calls (two) are not the requests'.
    return {
        "requests": n,
        "seconds": round(elapsed, 1),
        "latency_ms": summarize(latencies),
        "api_cpu_ms_per_request": round((c1 - c0) * 1000 / n, 3),
        "redis_commands_per_request": round((r1["calls"] - r0["calls"] - 2) / n, 1),
        "redis_scans_per_request": round((r1["scans"] - r0["scans"]) / n, 1),
        "redis_cpu_ms_per_request": round((r1["cpu_s"] - r0["cpu_s"]) * 1000 / n, 3),
    }


async def _side(stack: RunningStack, args: argparse.Namespace) -> dict[str, Any]:
    redis = Redis.from_url(stack.redis_url)
    try:
        await _fill(redis, args.streams)
        info = {
            "id": STAND_IN,
            "model": SERVED_NAME,
            "started_at": time.time(),
            "capacity": 8,
            "running": 0,
            "jobs": [],
            "tokens_per_s": 50.0,
            "tokens_per_s_peak": 50.0,
            "draining": False,
        }
        await fleet.register(redis, info, 3_600_000)  # its entry, and its index member for the new reader
        api = psutil.Process(stack.api_pid)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            ids = []
            for _ in range(args.jobs):
                resp = await client.post("/v1/jobs", json=body)
                assert resp.status_code == 202, resp.text
                ids.append(resp.json()["id"])
            polls = [f"/v1/jobs/{i}" for i in ids]
            first = (await client.get(polls[-1])).json()
            assert first["status"] == "queued" and first.get("queue_position") == args.jobs, first
            await _measure(client, redis, api, ["/metrics"], 50)  # warm-up
            await _measure(client, redis, api, polls, 100)
            keyspace = int(await redis.dbsize())
            print(f"  {keyspace} keys in Redis; {args.scrapes} scrapes…", flush=True)
            scrapes = await _measure(client, redis, api, ["/metrics"], args.scrapes)
            print(f"    {scrapes}", flush=True)
            print(f"  {args.polls} polls of {args.jobs} queued jobs…", flush=True)
            polled = await _measure(client, redis, api, polls, args.polls)
            print(f"    {polled}", flush=True)
        return {"redis_keys": keyspace, "metrics": scrapes, "poll_queued_job": polled}
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench scrape", description=__doc__)
    parser.add_argument("--baseline", type=Path, help="a checkout to measure first, as 'before'")
    parser.add_argument("--streams", type=int, default=50_000)
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=10_000)
    parser.add_argument(
        "--baseline-polls",
        type=int,
        default=1000,
        help="polls on the 'before' side (each one SCANs the keyspace: 10,000 take a quarter of an hour "
        "on a shared 2-core machine)",
    )
    parser.add_argument("--jobs", type=int, default=50, help="queued jobs the polls go round")
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    env = {"INFERQ_AUTH": "off", "INFERQ_MAX_QUEUE_SECONDS": "1000000000"}
    sides = [("before", args.baseline)] if args.baseline else []
    sides.append(("after", HERE))
    result: dict[str, Any] = {
        "benchmark": "scrape",
        "machine": describe(),
        "load_average_before": os.getloadavg(),
        "machine_busy_before": foreign_busy(),
        "sides": {},
    }
    for name, code in sides:
        print(f"scrape: {name} ({code})…", flush=True)
        with running_stack(
            demo_model(), worker=False, code=code, log_dir=args.log_dir / name, extra_env=env
        ) as stack:
            polls = args.baseline_polls if name == "before" else args.polls
            side = aio.run(_side(stack, argparse.Namespace(**{**vars(args), "polls": polls})))
            result["sides"][name] = {"code": str(code), **side}
    result["load_average_after"] = os.getloadavg()
    result["machine_busy_after"] = foreign_busy()
    print(
        f"  machine busy before/after (other work): {result['machine_busy_before']} / "
        f"{result['machine_busy_after']}; load average {result['load_average_after']}"
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
