"""What structured outputs cost the engine: tokens/s at a concurrency of 16 with 0 %, 50 % and 100 % of
the requests constrained by a JSON schema, in one run (the worker's engine in-process, same settings).

    python -m bench structured [--concurrency 16] [--tokens 64] [--rounds 3]

The schema asks for one string of at least 4,000 characters, so that a constrained request runs to
max_tokens like an unconstrained one and every mix generates the same number of tokens. The mixes run
in turn, `rounds` times, and each figure is the median over rounds: the engine's tokens/s, and the mean
tokens/s one request sees, for the unconstrained and for the constrained requests of the mix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from bench.harness import demo_model
from bench.machine import describe
from shared.settings import ModelSettings

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 4000}},
    "required": ["story"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
PROMPT = "Write a very long, detailed story about a dragon who learns to cook."


async def _one(engine: Any, rid: str, ids: list[int], options: Any) -> tuple[int, float]:
    t0 = time.perf_counter()
    handle = engine.submit(rid, ids, options)
    tokens = 0
    while True:
        update = await handle.next()
        tokens += len(update.new_tokens)
        if update.finished:
            return tokens, time.perf_counter() - t0


async def _mix(
    engine: Any, ids: list[int], n: int, constrained: int, tokens: int, tag: str
) -> dict[str, float]:
    from worker.engine import SamplingOptions

    plain = SamplingOptions(tokens, 0.7, 1.0, None)
    masked = SamplingOptions(tokens, 0.7, 1.0, None, response_format=RESPONSE_FORMAT)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(_one(engine, f"{tag}-{i}", ids, masked if i < constrained else plain) for i in range(n))
    )
    wall = time.perf_counter() - t0
    plain_results = results[constrained:]
    out = {"tokens": sum(t for t, _ in results), "tokens_per_s": sum(t for t, _ in results) / wall}
    # Per request: what one unconstrained client sees, whatever share of the batch is masked.
    if plain_results:
        out["plain_request_tokens_per_s"] = statistics.mean(t / s for t, s in plain_results)
    if constrained:
        out["masked_request_tokens_per_s"] = statistics.mean(t / s for t, s in results[:constrained])
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from worker.engine import Engine
    from worker.model import in_daemon_thread, load_model

    settings = ModelSettings(max_batch=max(args.concurrency, 16))
    model, tok = await in_daemon_thread(load_model, str(demo_model()), settings)
    engine = Engine(model, tok, settings)
    engine.start()
    await engine.warmup()
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    shares = {"0%": 0, "50%": args.concurrency // 2, "100%": args.concurrency}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in shares}
    await _mix(engine, ids, args.concurrency, args.concurrency, 8, "warm")  # builds the schema's matcher
    for r in range(args.rounds):
        for name, constrained in shares.items():
            runs[name].append(
                await _mix(engine, ids, args.concurrency, constrained, args.tokens, f"{name}{r}")
            )
            print(name, runs[name][-1], flush=True)
    await asyncio.to_thread(engine.stop)
    summary: dict[str, Any] = {}
    for name, samples in runs.items():
        summary[name] = {
            key: round(statistics.median(s[key] for s in samples), 1) for key in samples[0] if key != "tokens"
        }
    return {
        "machine": describe(),
        "concurrency": args.concurrency,
        "max_tokens": args.tokens,
        "rounds": args.rounds,
        "median": summary,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench structured", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=3)
    result = asyncio.run(_run(parser.parse_args(argv)))
    print(json.dumps(result, indent=2))
