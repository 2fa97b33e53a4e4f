"""Generated tokens/s through the whole stack at N concurrent jobs vs sequential in-process `generate`,
and idle time-to-first-token through the stack vs in-process, on the same model, in one run.

    python -m bench.throughput [--concurrency 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import demo_model, running_stack
from shared.settings import ModelSettings

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a bicycle works.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why the sky is blue, step by step.",
    "Tell me about the history of bread.",
    "Write a poem about the sea and then explain it.",
    "Describe how to plant a vegetable garden.",
]
TTFT_PROMPT = "What is the capital of France?"


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def in_process_generate(model_dir: Path, n: int, max_tokens: int) -> dict[str, float]:
    """The naive baseline: one request at a time through `model.generate`, greedy."""
    import torch

    from worker.model import load_model

    model, tok = load_model(str(model_dir), ModelSettings())
    tokens = 0
    t0 = time.perf_counter()
    for i in range(n):
        ids = tok.apply_chat_template(
            _chat(PROMPTS[i % len(PROMPTS)]),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    elapsed = time.perf_counter() - t0
    ttfts = []
    ids = tok.apply_chat_template(
        _chat(TTFT_PROMPT), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    for _ in range(8):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=1, do_sample=False)
        ttfts.append((time.perf_counter() - t) * 1000)
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_ms_p50": statistics.median(ttfts[1:]),
    }


async def in_process_engine_ttft(model_dir: Path) -> float:
    """TTFT of the same continuous-batching engine the worker runs, called in-process (no queue)."""
    samples = await engine_ttft_samples(model_dir, 8)
    return statistics.median(samples[1:])


async def engine_ttft_samples(
    model_dir: Path, n: int, settings: ModelSettings | None = None, gap_s: float = 0.0
) -> list[float]:
    """`n` TTFTs (ms) of the worker's engine called in-process, one request at a time (`gap_s` idle
    seconds before each), after warm-up."""
    from worker.engine import Engine, SamplingOptions
    from worker.model import in_daemon_thread, load_model

    settings = settings or ModelSettings()
    model, tok = await in_daemon_thread(load_model, str(model_dir), settings)
    engine = Engine(model, tok, settings)
    engine.start()
    await engine.warmup()
    ids = tok.apply_chat_template(_chat(TTFT_PROMPT), add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    samples = []
    for i in range(n):
        await asyncio.sleep(gap_s)
        t = time.perf_counter()
        handle = engine.submit(f"ttft-{i}", ids, SamplingOptions(1, 0.0, 1.0, None))
        while not (await handle.next()).new_tokens:
            pass
        samples.append((time.perf_counter() - t) * 1000)
        while not handle.closed:
            await handle.next()
    await asyncio.to_thread(engine.stop)
    return samples


async def _stream_job(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, float, float]:
    """Submit and stream one job; return (id, seconds to first token, seconds to done), from submit."""
    t0 = time.perf_counter()
    job = (await client.post("/v1/jobs", json=body)).json()
    first = 0.0
    event = ""
    async with client.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "token" and not first:
                    first = time.perf_counter() - t0
                if event in ("done", "error"):
                    break
    return job["id"], first, time.perf_counter() - t0


async def through_stack(base_url: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency * 2 + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300.0), limits=limits) as client:
        # Idle TTFT: one job at a time on an idle stack.
        ttfts = []
        for _ in range(8):
            body = {"messages": _chat(TTFT_PROMPT), "max_tokens": 1, "temperature": 0}
            _, first, _ = await _stream_job(client, body)
            ttfts.append(first * 1000)

        async def one(i: int) -> str:
            body = {"messages": _chat(PROMPTS[i % len(PROMPTS)]), "max_tokens": max_tokens, "temperature": 0}
            job_id, _, _ = await _stream_job(client, body)
            return job_id

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up round
        t0 = time.perf_counter()
        ids = await asyncio.gather(*(one(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
        jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in ids]
    tokens = sum(j["usage"]["completion_tokens"] for j in jobs)
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "peak_batch_size": max(j["peak_batch_size"] or 0 for j in jobs),
        "ttft_ms_p50": statistics.median(ttfts[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--worker-threads", type=int, help="INFERQ_MODEL__THREADS for the worker.")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    model_dir = demo_model()

    print(f"in-process model.generate, {args.baseline_requests} sequential requests…", flush=True)
    if args.skip_baseline:
        base, engine_ttft = {"tokens_per_s": float("nan"), "ttft_ms_p50": float("nan")}, float("nan")
    else:
        base = in_process_generate(model_dir, args.baseline_requests, args.max_tokens)
        print("in-process continuous-batching engine TTFT…", flush=True)
        engine_ttft = asyncio.run(in_process_engine_ttft(model_dir))
    print(f"whole stack, {args.concurrency} concurrent jobs…", flush=True)
    extra = {"INFERQ_MODEL__THREADS": str(args.worker_threads)} if args.worker_threads else {}
    with running_stack(model_dir, max_batch=max(32, args.concurrency), extra_env=extra) as stack:
        ours = asyncio.run(through_stack(stack.base_url, args.concurrency, args.max_tokens))

    result = {
        "machine": f"{platform.node()} · {platform.processor() or platform.machine()} · "
        f"{__import__('os').cpu_count()} cores · torch {__import__('torch').__version__}",
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "baseline_generate": base,
        "stack": ours,
        "throughput_ratio": ours["tokens_per_s"] / base["tokens_per_s"],
        "engine_ttft_ms_p50": engine_ttft,
        "ttft_overhead_vs_engine_ms": ours["ttft_ms_p50"] - engine_ttft,
        "ttft_overhead_vs_generate_ms": ours["ttft_ms_p50"] - base["ttft_ms_p50"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
