"""Idle queue overhead on time to first token: TTFT through inferq (one request at a time on an idle
stack, native `POST /v1/jobs` + SSE and the OpenAI stream) minus the TTFT of the same engine (the
worker's ContinuousBatchingManager wrapper, same settings) called in-process, measured in one run.

    python -m bench overhead [--samples 30] [--gap 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench import aio, profiling
from bench.chat_stream import chat_body, stream_chat
from bench.harness import SERVED_NAME, demo_model, running_stack
from bench.machine import (
    CpuByProcess,
    add_quiet_arguments,
    clean_options,
    describe,
    other_cores,
    run_clean,
    stack_markers,
)
from bench.rawhttp import Connection
from bench.stats import summarize, write_json
from bench.throughput import TTFT_PROMPT, engine_ttft_samples
from shared.settings import ModelSettings


async def native_ttft(base_url: str, n: int, gap: float) -> list[dict[str, float]]:
    """POST /v1/jobs, then GET its events; TTFT = first `token` event, from sending the POST. Each
    sample keeps the server's own timings (queue_ms, ttft_ms: created -> claimed, created -> token)."""
    api, events = Connection(base_url), Connection(base_url)
    body = {"messages": [{"role": "user", "content": TTFT_PROMPT}], "max_tokens": 1, "temperature": 0}
    samples = []
    try:
        for _ in range(n):
            await asyncio.sleep(gap)
            t0 = time.perf_counter()
            status, data = await api.request("POST", "/v1/jobs", json_body=body)
            t_accepted = time.perf_counter()
            if status != 202:
                raise RuntimeError(f"submit: HTTP {status}: {data[:200]!r}")
            job_id = json.loads(data)["id"]
            first, event = 0.0, ""
            async for _, line in events.stream_lines("GET", f"/v1/jobs/{job_id}/events"):
                if line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                elif line.startswith(b"data:") and event == "token" and not first:
                    first = time.perf_counter()
            _, data = await api.request("GET", f"/v1/jobs/{job_id}")
            job = json.loads(data)
            samples.append(
                {
                    "ttft_ms": (first - t0) * 1000,
                    "submit_ms": (t_accepted - t0) * 1000,
                    "server_queue_ms": job["timings"]["queue_ms"],
                    "server_ttft_ms": job["timings"]["ttft_ms"],
                }
            )
    finally:
        await api.close()
        await events.close()
    return samples


async def openai_ttft(base_url: str, n: int, gap: float) -> list[float]:
    conn = Connection(base_url)
    out = []
    try:
        for _ in range(n):
            await asyncio.sleep(gap)
            r = await stream_chat(conn, chat_body(SERVED_NAME, TTFT_PROMPT, 1))
            out.append(r.ttft_s * 1000)
    finally:
        await conn.close()
    return out


def _engine_samples(model_dir: str, n: int, gap: float) -> list[float]:
    """In a fresh process (its own torch threads, memory freed afterwards): the worker's engine alone."""
    return asyncio.run(engine_ttft_samples(Path(model_dir), n, ModelSettings(), gap_s=gap))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=30, help="Measured requests per path.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.5, help="Idle seconds before each request.")
    parser.add_argument("--profile", action="store_true", help="py-spy the API and the worker meanwhile.")
    add_quiet_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path)


def _ttft_part(values: list[float]) -> dict[str, float]:
    return summarize(values, digits=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = demo_model()
    n = args.samples + args.warmup
    print(f"overhead: in-process engine TTFT, {args.samples} requests…", flush=True)

    def engine_attempt() -> dict[str, Any]:
        by_process = CpuByProcess({}, {"engine process": "multiprocessing.spawn"}).start()
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            samples = pool.submit(_engine_samples, str(model_dir), n, args.gap).result()[args.warmup :]
        return {"samples": samples, "cpu_cores_by_process": by_process.cores()}

    engine_run, engine_clean = run_clean(engine_attempt, other_cores, **clean_options(args))
    engine = engine_run["samples"]
    print(f"overhead: through inferq, {args.samples} native + {args.samples} OpenAI requests…", flush=True)
    env = {"INFERQ_AUTH": "off"}
    with running_stack(model_dir, log_dir=args.log_dir, extra_env=env) as stack:
        named = {"inferq api": stack.api_pid, "inferq worker": stack.worker_pid or 0}
        markers = stack_markers(stack.redis_url, stack.database_url)

        def stack_attempt() -> dict[str, Any]:
            by_process = CpuByProcess(named, markers).start()
            pids = {"api": stack.api_pid, "worker": stack.worker_pid or 0} if args.profile else {}
            with profiling.recording_all(pids, args.log_dir, "overhead") as recs:
                native = aio.run(native_ttft(stack.base_url, n, args.gap))[args.warmup :]
                openai = aio.run(openai_ttft(stack.base_url, n, args.gap))[args.warmup :]
            cores = by_process.cores()
            return {"native": native, "openai": openai, "recs": recs, "cpu_cores_by_process": cores}

        stack_run, stack_clean = run_clean(stack_attempt, other_cores, **clean_options(args))
    native, openai, recs = stack_run["native"], stack_run["openai"], stack_run["recs"]
    engine_s = _ttft_part(engine)
    native_s = _ttft_part([s["ttft_ms"] for s in native])
    openai_s = _ttft_part(openai)
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "machine": describe(),
        "samples": args.samples,
        "gap_s": args.gap,
        "engine_in_process_ttft_ms": engine_s,
        "inferq_native_ttft_ms": native_s,
        "inferq_openai_ttft_ms": openai_s,
        "overhead_native_p50_ms": round(native_s["p50"] - engine_s["p50"], 1),
        "overhead_openai_p50_ms": round(openai_s["p50"] - engine_s["p50"], 1),
        "clean": {"engine": engine_clean, "stack": stack_clean},
        "cpu_cores_by_process": {
            "engine": engine_run["cpu_cores_by_process"],
            "stack": stack_run["cpu_cores_by_process"],
        },
        "native_breakdown_p50_ms": {
            "submit_http": summarize([s["submit_ms"] for s in native], digits=1)["p50"],
            "server_created_to_claimed": summarize([s["server_queue_ms"] for s in native], digits=1)["p50"],
            "server_created_to_first_token": summarize([s["server_ttft_ms"] for s in native], digits=1)[
                "p50"
            ],
        },
    }
    for name, raw in recs.items():
        result.setdefault("profiles", {})[name] = summary = profiling.summarize(raw)
        profiling.print_summary(f"inferq {name}, idle TTFT requests", summary)
    print(
        f"  engine in-process TTFT p50 {engine_s['p50']:.1f} ms · inferq native p50 {native_s['p50']:.1f} ms "
        f"(+{result['overhead_native_p50_ms']:.1f}) · inferq OpenAI stream p50 {openai_s['p50']:.1f} ms "
        f"(+{result['overhead_openai_p50_ms']:.1f})"
    )
    print(f"  native breakdown (p50 ms): {result['native_breakdown_p50_ms']}")
    write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
