"""Waiting for jobs: N clients each submit one chat job at once and wait for its result, three ways,
against one stack in one run: `Prefer: wait=60` (one request that returns the finished job), polling
`GET /v1/jobs/{id}` every 50 ms, and following the job's SSE stream. Each mode is measured over the
same window: the CPU of every process of the stack (API, worker, PostgreSQL, Valkey) and of the
clients, the requests the API served, and the engine's tokens/s (the worker's own counter of
generated tokens, read at both ends of the window).

    python -m bench waiting [--clients 200] [--max-tokens 32] [--poll-ms 50] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench import aio
from bench.harness import RunningStack, demo_model, running_stack
from bench.machine import CpuByProcess, describe, stack_markers
from bench.procs import free_port
from bench.stats import write_json
from shared.headers import PREFER

TERMINAL = ("succeeded", "failed", "cancelled", "expired")


def _job(i: int, max_tokens: int) -> dict[str, Any]:
    prompt = f"Tell me one short fact about the number {i}."
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


class _Counter:
    requests = 0
    errors = 0


async def _prefer_wait(client: httpx.AsyncClient, body: dict[str, Any], n: _Counter) -> dict[str, Any]:
    resp = await client.post("/v1/jobs", json=body, headers={PREFER: "wait=60"})
    n.requests += 1
    assert resp.status_code in (200, 202), resp.text
    job: dict[str, Any] = resp.json()
    while job["status"] not in TERMINAL:
        resp = await client.get(f"/v1/jobs/{job['id']}", headers={PREFER: "wait=60"})
        n.requests += 1
        assert resp.status_code == 200, resp.text
        job = resp.json()
    return job


async def _poll(client: httpx.AsyncClient, body: dict[str, Any], n: _Counter, every: float) -> dict[str, Any]:
    job: dict[str, Any] = (await client.post("/v1/jobs", json=body)).json()
    n.requests += 1
    job_id = job["id"]
    while job.get("status") not in TERMINAL:
        await asyncio.sleep(every)
        try:
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
        except httpx.TransportError:  # a keep-alive connection the server closed: poll again, as clients do
            n.errors += 1
        n.requests += 1
    return job


async def _sse(client: httpx.AsyncClient, body: dict[str, Any], n: _Counter) -> dict[str, Any]:
    created = (await client.post("/v1/jobs", json=body)).json()
    async with client.stream("GET", f"/v1/jobs/{created['id']}/events") as resp:
        async for line in resp.aiter_lines():
            if line.startswith("event: done") or line.startswith("event: error"):
                break
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{created['id']}")).json()
    n.requests += 3
    return job


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def _jobs_of(client: httpx.AsyncClient, tag: str) -> list[dict[str, Any]]:
    """The jobs this mode submitted (by their metadata tag), newest first."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = (await client.get("/v1/jobs", params=params)).json()
        found += [j for j in page["data"] if (j.get("metadata") or {}).get("bench") == tag]
        if not page["has_more"]:
            return found
        after = page["next_after"]


async def _generated(metrics_url: str) -> float:
    """The worker's count of generated tokens (its Prometheus counter)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(metrics_url)).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inferq:generation_tokens_total")
    )


async def _mode(stack: RunningStack, metrics_url: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """All clients at once for `window` seconds: every process's CPU, the API's requests, and the
    engine's tokens/s over the window. Then what is left of the mode's jobs is cancelled, so that the
    next mode starts on an idle engine."""
    n = _Counter()
    tag = f"{mode}-{time.time_ns()}"
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=180, limits=limits) as client:

        async def one(i: int) -> dict[str, Any]:
            body = {**_job(i, args.max_tokens), "metadata": {"bench": tag}}
            if mode == "prefer_wait":
                return await _prefer_wait(client, body, n)
            if mode == "poll":
                return await _poll(client, body, n, args.poll_ms / 1000)
            return await _sse(client, body, n)

        named = {"inferq api": stack.api_pid, "inferq worker": stack.worker_pid or 0}
        cpu = CpuByProcess(named, stack_markers(stack.redis_url, stack.database_url)).start()
        tokens0 = await _generated(metrics_url)
        t0_wall, t0 = time.time(), time.perf_counter()
        tasks = [asyncio.create_task(one(i)) for i in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.window)
        elapsed = time.perf_counter() - t0
        cores = cpu.cores()
        requests = n.requests
        tokens = await _generated(metrics_url) - tokens0
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        jobs = await _jobs_of(client, tag)
        for job in jobs:
            if job["status"] not in TERMINAL:
                await client.post(f"/v1/jobs/{job['id']}/cancel")
    inside = [j for j in jobs if j["status"] == "succeeded" and _ts(j["finished_at"]) <= t0_wall + elapsed]
    return {
        "clients": args.clients,
        "window_s": round(elapsed, 1),
        "clients_with_their_result": len(done),
        "jobs_finished_in_window": len(inside),
        "api_cpu_cores": cores.get("inferq api", 0.0),
        "cpu_cores_by_process": cores,
        "api_requests": requests,
        "api_requests_per_s": round(requests / elapsed, 1),
        "client_transport_errors": n.errors,
        "engine_tokens_per_s": round(tokens / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench waiting", description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--poll-ms", type=float, default=50.0)
    parser.add_argument("--window", type=float, default=60.0, help="seconds each mode is measured")
    parser.add_argument("--modes", default="prefer_wait,poll,sse")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the stack's processes")
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port()
    env = {
        "INFERQ_AUTH": "off",
        "INFERQ_MAX_QUEUE_SECONDS": "1000000000",
        "INFERQ_WORKER__METRICS_PORT": str(metrics_port),
        "INFERQ_WORKER__METRICS_HOST": "127.0.0.1",
    }
    env.update(dict(e.split("=", 1) for e in args.env))
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    result: dict[str, Any] = {"benchmark": "waiting", "machine": describe(), "modes": {}}
    with running_stack(demo_model(), log_dir=args.log_dir, extra_env=env) as stack:
        # One warm-up round, so that the first mode does not pay for the engine's first steps.
        aio.run(
            _mode(
                stack,
                metrics_url,
                "prefer_wait",
                argparse.Namespace(**{**vars(args), "clients": 8}),
            )
        )
        for mode in args.modes.split(","):
            print(f"waiting: {args.clients} clients, {mode}…", flush=True)
            r = aio.run(_mode(stack, metrics_url, mode, args))
            result["modes"][mode] = r
            print(
                f"  {mode:<12} api {r['api_cpu_cores']:.2f} cores, {r['api_requests_per_s']} req/s, "
                f"engine {r['engine_tokens_per_s']} tokens/s, {r['jobs_finished_in_window']} jobs "
                f"finished in {r['window_s']} s; cores {r['cpu_cores_by_process']}",
                flush=True,
            )
    modes = result["modes"]
    if "poll" in modes and "prefer_wait" in modes:
        poll, wait = modes["poll"], modes["prefer_wait"]
        result["poll_vs_wait"] = {
            "api_cpu_ratio": round(poll["api_cpu_cores"] / max(wait["api_cpu_cores"], 0.01), 2),
            "engine_tokens_per_s_ratio": round(
                poll["engine_tokens_per_s"] / max(wait["engine_tokens_per_s"], 0.1), 3
            ),
        }
        print(f"  polling every {args.poll_ms:.0f} ms vs Prefer: wait: {result['poll_vs_wait']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
