"""Inputs embedded per second: through inferq (`POST /v1/embeddings`, one input per request, 64 clients at
once, an embedding worker with all-MiniLM-L6-v2) vs sentence-transformers' `encode` of the same texts in
one process with its default batch size; texts of about 32 tokens. One run of each. The stack's jobs then
say where a request's time went: waiting in the queue (created -> claimed), on the worker (claimed ->
result written), and the rest (API admission, the wait for the job's end, the response).

    python -m bench embeddings [--requests 4000] [--concurrency 64] [--tokens 32] [--out FILE] [--profile DIR]
        [--baseline CHECKOUT] [--skip-in-process] [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench import aio, profiling
from bench.harness import RunningStack, running_stack
from bench.machine import CpuByProcess, describe, stack_markers
from bench.rawhttp import Connection
from bench.stats import summarize, write_json

EMBED = "all-MiniLM-L6-v2"
_WORDS = (
    "queue worker vector search index corpus document model batch token latency cache shard replica "
    "river mountain forest city harbour market garden library station bridge castle island valley"
).split()


def embedding_model() -> Path:
    from shared.settings import Settings
    from worker.model import fetch_embedding_model

    return fetch_embedding_model(Path(Settings().embedding_model_path), progress=print)


def make_texts(model_dir: Path, n: int, tokens: int) -> list[str]:
    """`n` different texts of `tokens` tokens each, special tokens included (as the model reads them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = []
    for i in range(n):
        words = [f"item {i}"]
        j = i
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.append(_WORDS[j % len(_WORDS)])
            j = j * 7 + 3
        texts.append(" ".join(words))
    return texts


def in_process(model_dir: Path, texts: list[str]) -> dict[str, Any]:
    """sentence-transformers' `encode` of every text, default batch size, after one warm-up call."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.encode(texts[:64])
    t0, cpu0 = time.perf_counter(), time.process_time()
    vectors = model.encode(texts)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert len(vectors) == len(texts)
    return {
        "seconds": round(seconds, 3),
        "inputs_per_s": round(len(texts) / seconds, 1),
        "cpu_ms_per_input": round(cpu / len(texts) * 1000, 3),
    }


def _in_process_like_a_worker(model_dir: Path, texts: list[str]) -> dict[str, Any]:
    """`in_process` in a fresh process with the OpenMP setting `inferq worker` gives itself (libgomp
    spins `SPINCOUNT` times, then sleeps; read when torch loads)."""
    from worker.cpu_threads import SPINCOUNT

    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return in_process(model_dir, texts)


def in_process_child(model_dir: Path, texts: list[str]) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_in_process_like_a_worker, model_dir, texts).result()


async def _client(base_url: str, texts: list[str], latencies: list[float]) -> None:
    conn = Connection(base_url)
    try:
        for text in texts:
            body = {"model": EMBED, "input": text, "encoding_format": "base64"}
            t0 = time.perf_counter()
            status, data = await conn.request("POST", "/v1/embeddings", json_body=body)
            if status != 200:
                raise RuntimeError(f"POST /v1/embeddings: HTTP {status}: {data[:300]!r}")
            latencies.append(time.perf_counter() - t0)
    finally:
        await conn.close()


async def load(base_url: str, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Every text as its own request, `concurrency` clients at once; (seconds, latencies)."""
    latencies: list[float] = []
    shares = [texts[i::concurrency] for i in range(concurrency)]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(base_url, share, latencies) for share in shares))
    return time.perf_counter() - t0, latencies


async def job_timings(database_url: str, since: float) -> dict[str, Any]:
    """Means over the jobs created since `since` (epoch seconds): queue (created -> claimed), worker
    (claimed -> finished), and the forward passes' batch size."""
    import asyncpg

    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, avg(queue_ms) AS queue_ms, avg(total_ms - queue_ms) AS worker_ms,"
            " avg(peak_batch_size) AS batch FROM jobs WHERE created_at >= to_timestamp($1)"
            " AND status = 'succeeded'",
            since,
        )
    finally:
        await conn.close()
    return {
        "jobs": int(row["n"]),
        "queue_ms": round(float(row["queue_ms"] or 0), 2),
        "worker_ms": round(float(row["worker_ms"] or 0), 2),
        "mean_batch": round(float(row["batch"] or 0), 1),
    }


async def redis_calls(redis_url: str) -> dict[str, int]:
    """Calls of each Redis command so far (`INFO commandstats`), by command name."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        stats: dict[str, Any] = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _measure(
    stack: RunningStack, texts: list[str], concurrency: int, profile_dir: Path | None
) -> dict[str, Any]:
    await load(stack.base_url, texts[:concurrency], concurrency)  # warm-up: connections, first passes
    named = {"api": stack.api_pid, "worker": stack.worker_pid or 0}
    cpu = CpuByProcess(named, stack_markers(stack.redis_url, stack.database_url)).start()
    since = time.time()
    calls0 = await redis_calls(stack.redis_url)
    pids = named if profile_dir is not None else {}
    with profiling.recording_all(pids, profile_dir or Path("."), "embeddings") as recs:
        seconds, latencies = await load(stack.base_url, texts, concurrency)
    cores = cpu.cores()
    for name, raw in recs.items():
        profiling.print_summary(
            f"inferq {name}, embeddings at concurrency {concurrency}", profiling.summarize(raw)
        )
    calls1 = await redis_calls(stack.redis_url)
    timings = await job_timings(stack.database_url, since)
    per_input = {k: round((n - calls0.get(k, 0)) / len(texts), 2) for k, n in calls1.items()}
    per_input = {k: v for k, v in sorted(per_input.items(), key=lambda kv: -kv[1]) if v >= 0.01}
    mean_ms = sum(latencies) / len(latencies) * 1000
    return {
        "seconds": round(seconds, 3),
        "inputs_per_s": round(len(texts) / seconds, 1),
        "latency_ms": summarize([x * 1000 for x in latencies]),
        "jobs": timings,
        # CPU time per input, by process: where the machine's time goes (the worker's includes the model).
        "cpu_ms_per_input": {k: round(v * seconds / len(texts) * 1000, 3) for k, v in cores.items()},
        # Redis commands per input (the queue, events, quotas; the two counter reads included).
        "redis_calls_per_input": {"all": round(sum(per_input.values()), 2), **per_input},
        "share_of_latency": {
            "queue": round(timings["queue_ms"] / mean_ms, 3),
            "worker": round(timings["worker_ms"] / mean_ms, 3),
            "api_and_wait": round(1 - (timings["queue_ms"] + timings["worker_ms"]) / mean_ms, 3),
        },
    }


def through_inferq(
    model_dir: Path,
    texts: list[str],
    concurrency: int,
    profile_dir: Path | None = None,
    code: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    extra = {
        "INFERQ_MODEL__SERVED_NAME": EMBED,
        "INFERQ_EXTRA_MODELS": json.dumps({EMBED: str(model_dir)}),
        "INFERQ_MAX_QUEUE_SECONDS": "100000",  # the benchmark measures the queue, not admission
        "INFERQ_AUTH": "off",  # as bench overhead: an open API in `auto` reads the keys table per request
        **(env or {}),
    }
    probe = ("/v1/embeddings", {"model": EMBED, "input": "ready?"})
    with running_stack(model_dir, max_batch=concurrency, extra_env=extra, code=code, probe=probe) as stack:
        return aio.run(_measure(stack, texts, concurrency, profile_dir))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench embeddings", description=__doc__)
    parser.add_argument("--requests", type=int, default=4000, help="inputs (one per request)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per text, special tokens included")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the API and the worker into DIR")
    parser.add_argument("--skip-in-process", action="store_true", help="measure inferq only")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the stack's processes (repeatable), e.g. INFERQ_WORKER__BUSY_POLL_DELAY=0.05",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of inferq (e.g. a `git worktree` of main) to measure first, the same way",
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    model_dir = embedding_model()
    texts = make_texts(model_dir, args.requests, args.tokens)
    reference = {} if args.skip_in_process else in_process_child(model_dir, texts)
    if reference:
        print(f"in-process encode: {reference['inputs_per_s']} inputs/s", flush=True)
    baseline = None
    if args.baseline is not None:
        baseline = through_inferq(model_dir, texts, args.concurrency, code=args.baseline.resolve(), env=env)
        print(f"baseline {args.baseline}: {baseline['inputs_per_s']} inputs/s", flush=True)
    inferq = through_inferq(model_dir, texts, args.concurrency, args.profile, env=env)
    ratio = round(inferq["inputs_per_s"] / reference["inputs_per_s"], 3) if reference else None
    result = {
        "machine": describe(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "tokens_per_text": args.tokens,
        "env": env,
        "in_process": reference,
        "inferq": inferq,
        "ratio": ratio,
        **({"baseline": {"code": str(args.baseline), **baseline}} if baseline else {}),
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
