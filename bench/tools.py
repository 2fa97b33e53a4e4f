"""What tool calling costs: streaming chat tokens/s through inferq (built-in engine) at a concurrency of 16
with 0 % and 100 % of the requests carrying tools, in one run on one stack.

    python -m bench tools [--concurrency 16] [--requests 64] [--max-tokens 64] [--rounds 1]

A request with tools asks for `tool_choice` "required" (by default) and one function whose only argument
is a string of at least 4,000 characters, so that its call, grammar-constrained from the first token,
runs to max_tokens like a plain answer and both mixes generate the same number of tokens. Both use
temperature 0.7. The mixes run in turn (0 %, 100 %), `rounds` times; each figure is the median over
rounds. Tokens are counted from the `usage` inferq sends; the time to first token counts a first
tool-call delta as well as a first content delta.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import SERVED_NAME, demo_model, running_stack
from bench.loadgen import closed_loop
from bench.machine import describe
from bench.rawhttp import Connection
from bench.stats import summarize

PROMPT = "Write down, at length, a note about the weather in {city} for a traveller."
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Dakar")
NOTE_TOOL = {
    "type": "function",
    "function": {
        "name": "save_note",
        "description": "Save a long note for the user.",
        "parameters": {
            "type": "object",
            "properties": {"note": {"type": "string", "minLength": 4000}},
            "required": ["note"],
            "additionalProperties": False,
        },
    },
}


def _body(i: int, max_tokens: int, tool_choice: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": PROMPT.format(city=CITIES[i % len(CITIES)])}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tool_choice is not None:
        body |= {"tools": [NOTE_TOOL], "tool_choice": tool_choice, "parallel_tool_calls": False}
    return body


async def _stream(conn: Connection, body: dict[str, Any]) -> tuple[float, float, int, int]:
    """(seconds to the first content or tool-call delta, seconds in all, completion tokens, calls)."""
    t0 = time.perf_counter()
    first = 0.0
    usage: dict[str, Any] | None = None
    calls: set[int] = set()
    async for status, line in conn.stream_lines("POST", "/v1/chat/completions", json_body=body):
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {line[:300]!r}")
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            calls.update(int(c.get("index", 0)) for c in delta.get("tool_calls") or ())
            if (delta.get("content") or delta.get("tool_calls")) and not first:
                first = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("no usage in the stream")
    total = time.perf_counter() - t0
    return first or total, total, int(usage["completion_tokens"]), len(calls)


async def _mix(
    base_url: str, *, concurrency: int, requests: int, max_tokens: int, share: float, tool_choice: str
) -> dict[str, Any]:
    """`requests` streamed chat completions, `concurrency` in flight (closed loop); the first `share` of
    every `concurrency` consecutive requests carry tools, so that the share holds at every moment."""
    with_tools = round(share * concurrency)

    async def one(conn: Connection, i: int) -> tuple[float, float, int, int]:
        choice = tool_choice if i % concurrency < with_tools else None
        return await _stream(conn, _body(i, max_tokens, choice))

    done, elapsed = await closed_loop(base_url, concurrency, requests, one)
    tokens = sum(r[2] for r in done)
    return {
        "requests": len(done),
        "requests_with_tools": sum(1 for i in range(requests) if i % concurrency < with_tools),
        "calls": sum(r[3] for r in done),
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 2),
        "ttft_ms": summarize([r[0] * 1000 for r in done], digits=1),
        "latency_ms": summarize([r[1] * 1000 for r in done], digits=1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    shares = {"0%": 0.0, "100%": 1.0}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in shares}
    log_dir = Path(tempfile.mkdtemp(prefix="inferq-bench-tools-"))
    env = {"INFERQ_AUTH": "off", "INFERQ_MAX_QUEUE_SECONDS": "100000"}
    with running_stack(demo_model(), max_batch=args.max_batch, log_dir=log_dir, extra_env=env) as stack:
        # Warm-up: the engine's first steps, and the tool grammar's matcher (built once, then copied).
        for share in shares.values():
            asyncio.run(
                _mix(
                    stack.base_url,
                    concurrency=2,
                    requests=2,
                    max_tokens=8,
                    share=share,
                    tool_choice=args.tool_choice,
                )
            )
        for rnd in range(args.rounds):
            for name, share in shares.items():
                level = asyncio.run(
                    _mix(
                        stack.base_url,
                        concurrency=args.concurrency,
                        requests=args.requests,
                        max_tokens=args.max_tokens,
                        share=share,
                        tool_choice=args.tool_choice,
                    )
                )
                runs[name].append(level)
                print(f"round {rnd + 1}, {name} with tools: {level['tokens_per_s']} tokens/s", flush=True)
    median = {
        name: round(statistics.median(r["tokens_per_s"] for r in samples), 2)
        for name, samples in runs.items()
    }
    return {
        "machine": describe(),
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "tool_choice": args.tool_choice,
        "rounds": args.rounds,
        "tokens_per_s_median": median,
        "ratio_100_to_0": round(median["100%"] / median["0%"], 3) if median["0%"] else None,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench tools", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="per mix and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tool-choice", default="required", choices=("required", "auto"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
