"""Background responses (`POST /v1/responses` with `background: true`): the create rate of one API
process next to `POST /v1/jobs` (same process, client and concurrency, no worker), then the time from
a resume request (`GET /v1/responses/{id}?stream=true&starting_after=N`) to its first event: for a
response still streaming, for a finished one whose events are in Redis, and for one whose events have
expired (rebuilt from Postgres).

    python -m bench responses [--concurrency 64] [--seconds 10] [--resumes 40]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import aio, loadgen
from bench.harness import SERVED_NAME, demo_model, running_stack
from bench.machine import CpuByProcess, describe
from bench.stats import summarize, write_json
from bench.submit import _clean
from shared import keys

JOB = {"messages": [{"role": "user", "content": "Say hello in French."}], "max_tokens": 16}
BACKGROUND = {
    "model": SERVED_NAME,
    "input": "Say hello in French.",
    "max_output_tokens": 16,
    "background": True,
}
LONG = {
    "model": SERVED_NAME,
    "input": "Write a very long, detailed story about a dragon who learns to cook.",
    "max_output_tokens": 64,
    "background": True,
}


def _load(
    url: str, path: str, body: dict[str, Any], expect: int, args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    call = loadgen.Call("POST", path, body, expect)
    cpu = CpuByProcess({"inferq api": pid}).start()
    run = loadgen.run_for(url, call, concurrency=args.concurrency, seconds=args.seconds, warmup=args.warmup)
    out = aio.run(run).summary()
    out["api_cpu_cores"] = cpu.cores().get("inferq api")
    return out


def create_rates(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    env = {"INFERQ_AUTH": "off", "INFERQ_MAX_QUEUE_SECONDS": "1000000000"}
    with running_stack(model_dir, worker=False, log_dir=args.log_dir, extra_env=env) as stack:
        out = {}
        for name, path, body, expect in (
            ("jobs", "/v1/jobs", JOB, 202),
            ("background_responses", "/v1/responses", BACKGROUND, 200),
        ):
            print(f"responses: POST {path}, {args.concurrency} clients, {args.seconds:.0f} s…", flush=True)
            out[name] = _load(stack.base_url, path, body, expect, args, stack.api_pid)
            out[name].update(_clean(stack.redis_url, stack.database_url))
    out["ratio_responses_vs_jobs"] = round(
        out["background_responses"]["req_per_s"] / out["jobs"]["req_per_s"], 3
    )
    return out


async def _first_event_ms(client: httpx.AsyncClient, response_id: str, after: int) -> float:
    t0 = time.perf_counter()
    params = {"stream": "true", "starting_after": str(after)}
    async with client.stream("GET", f"/v1/responses/{response_id}", params=params) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                return (time.perf_counter() - t0) * 1000
    raise AssertionError(f"no event after {after} for {response_id}")


async def _create(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    resp = await client.post("/v1/responses", json=body)
    resp.raise_for_status()
    return str(resp.json()["id"])


async def _finished(client: httpx.AsyncClient, response_id: str) -> None:
    while (await client.get(f"/v1/responses/{response_id}")).json()["status"] in ("queued", "in_progress"):
        await asyncio.sleep(0.1)


async def _resumes(base_url: str, redis_url: str, n: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        # Live: a response that is streaming now (a few of its tokens out), resumed after its first
        # events: its first event is in the backlog, so this times the resume, not the next token.
        live = []
        with redis.Redis.from_url(redis_url) as r:
            for _ in range(n // 4):
                response_id = await _create(client, LONG)
                stream = keys.events_stream("job_" + response_id.removeprefix("resp_"))
                while int(r.xlen(stream)) < 4:  # running, and three tokens published
                    await asyncio.sleep(0.005)
                live.append(await _first_event_ms(client, response_id, 4))
                await _finished(client, response_id)
        ids = [await _create(client, BACKGROUND) for _ in range(n)]
        for response_id in ids:
            await _finished(client, response_id)
        in_redis = [await _first_event_ms(client, response_id, 6) for response_id in ids]
        with redis.Redis.from_url(redis_url) as r:
            for response_id in ids:
                r.delete(keys.events_stream("job_" + response_id.removeprefix("resp_")))
        from_postgres = [await _first_event_ms(client, response_id, 6) for response_id in ids]
    return {
        "streaming": summarize(live),
        "finished_events_in_redis": summarize(in_redis),
        "finished_rebuilt_from_postgres": summarize(from_postgres),
    }


def resume_latency(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    with running_stack(model_dir, log_dir=args.log_dir, extra_env={"INFERQ_AUTH": "off"}) as stack:
        print(f"responses: {args.resumes} resumes of each kind…", flush=True)
        return aio.run(_resumes(stack.base_url, stack.redis_url, args.resumes))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench responses", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--resumes", type=int, default=40)
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = demo_model()
    result = {
        "benchmark": "responses",
        "machine": describe(),
        "create": create_rates(args, model_dir),
        "resume_first_event_ms": resume_latency(args, model_dir),
    }
    create = result["create"]
    for name in ("jobs", "background_responses"):
        r = create[name]
        lat = r["latency_ms"]
        print(
            f"  POST {name:<21} {r['req_per_s']:>8.1f} req/s  p50 {lat['p50']:.1f} ms  "
            f"p99 {lat['p99']:.1f} ms  errors {r['errors']}  api {r['api_cpu_cores']} cores"
        )
    print(f"  ratio background responses / jobs: {create['ratio_responses_vs_jobs']}")
    for name, s in result["resume_first_event_ms"].items():
        print(
            f"  resume → first event, {name:<32} p50 {s['p50']:.1f} ms  p99 {s['p99']:.1f} ms  (n={s['n']})"
        )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
