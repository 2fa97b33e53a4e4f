"""Throughput of inferq vs `transformers serve --continuous-batching` vs the naive server: generated
tokens/s and TTFT p50/p99 at each concurrency, the same client, prompts, greedy decoding and max_tokens
for all three, each system started fresh and alone on the machine.

    python -m bench throughput [--concurrency 1,4,16,64] [--requests-per-level 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from bench import aio, profiling, systems
from bench.chat_stream import StreamResult, chat_body, stream_chat
from bench.harness import demo_model
from bench.loadgen import closed_loop
from bench.machine import (
    CpuByProcess,
    CpuMeter,
    add_quiet_arguments,
    clean_options,
    describe,
    guarded,
    other_cores,
    run_clean,
)
from bench.rawhttp import Connection
from bench.stats import summarize, write_json
from bench.throughput import PROMPTS


async def run_level(
    running: systems.Running, *, concurrency: int, requests: int, max_tokens: int
) -> dict[str, Any]:
    """`requests` streamed chat completions, `concurrency` in flight at a time (closed loop)."""
    base_url, model = running.base_url, running.model

    async def one(conn: Connection, i: int) -> StreamResult:
        return await stream_chat(conn, chat_body(model, PROMPTS[i % len(PROMPTS)], max_tokens))

    meter, by_process = CpuMeter().start(), CpuByProcess(running.pids, running.markers).start()
    done, elapsed = await closed_loop(base_url, concurrency, requests, one)
    tokens = sum(r.tokens for r in done)
    ttft = summarize([r.ttft_s * 1000 for r in done], digits=1)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 2),
        "ttft_ms": ttft,
        "latency_ms": summarize([r.total_s * 1000 for r in done], digits=1),
        "usage_reported": all(r.usage_reported for r in done),
        "machine_busy": meter.busy(),
        "cpu_cores_by_process": by_process.cores(),
        "texts": [r.text for r in done[: len(PROMPTS)]],
    }


async def warm_up(base_url: str, model: str) -> None:
    conns = [Connection(base_url) for _ in range(2)]
    await asyncio.gather(
        *(stream_chat(c, chat_body(model, p, 8)) for c, p in zip(conns, PROMPTS, strict=False))
    )
    for c in conns:
        await c.close()


def measure_system(name: str, args: argparse.Namespace, model_dir: Path, levels: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"levels": []}
    with systems.start(
        name,
        model_dir,
        max_batch=args.max_batch,
        generate_threads=args.naive_threads,
        log_dir=args.log_dir,
    ) as running:
        out["config"] = running.config
        aio.run(warm_up(running.base_url, running.model))
        for c in levels:
            n = max(args.waves * c, args.requests_per_level)
            print(f"  {name}: concurrency {c}, {n} requests…", flush=True)
            profile = name in args.profile and c == args.profile_concurrency

            def measure(c: int = c, n: int = n, profile: bool = profile) -> dict[str, Any]:
                pids = running.pids if profile else {}
                with profiling.recording_all(pids, args.log_dir, f"{name}-c{c}") as recs:
                    level = aio.run(
                        guarded(
                            run_level(running, concurrency=c, requests=n, max_tokens=args.max_tokens),
                            running.pids,
                            running.markers,
                            2 * args.max_other_cores,
                        )
                    )
                for proc_name, raw in recs.items():
                    summary = profiling.summarize(raw)
                    level.setdefault("profiles", {})[proc_name] = summary
                    profiling.print_summary(f"{name} {proc_name} at concurrency {c}", summary)
                return level

            level, clean = run_clean(measure, other_cores, **clean_options(args))
            level["clean"] = clean
            out["levels"].append(level)
            print(
                f"    {level['tokens_per_s']:.1f} tokens/s, TTFT p50 {level['ttft_ms']['p50']:.0f} ms "
                f"p99 {level['ttft_ms']['p99']:.0f} ms ({level['tokens']} tokens in {level['seconds']} s); "
                f"CPU cores: {level['cpu_cores_by_process']}",
                flush=True,
            )
    return out


def ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    by = {
        name: {lv["concurrency"]: lv for lv in sysres["levels"]} for name, sysres in result["systems"].items()
    }
    out: dict[str, dict[str, float]] = {}
    ours = by.get("inferq", {})
    for c, lv in ours.items():
        row: dict[str, float] = {}
        for peer in ("transformers-serve", "naive"):
            other = by.get(peer, {}).get(c)
            if other and other["tokens_per_s"] > 0:
                row[f"tokens_per_s_vs_{peer}"] = round(lv["tokens_per_s"] / other["tokens_per_s"], 2)
                row[f"ttft_p50_ms_minus_{peer}"] = round(lv["ttft_ms"]["p50"] - other["ttft_ms"]["p50"], 1)
        out[str(c)] = row
    return out


def same_outputs(result: dict[str, Any]) -> dict[str, float]:
    """Share of the concurrency-1 outputs of each peer identical to inferq's (all greedy, same prompts)."""
    first = {
        name: sysres["levels"][0]["texts"] for name, sysres in result["systems"].items() if sysres["levels"]
    }
    ours = first.get("inferq")
    if not ours:
        return {}
    return {
        peer: round(sum(a == b for a, b in zip(ours, texts, strict=False)) / max(1, len(ours)), 2)
        for peer, texts in first.items()
        if peer != "inferq"
    }


def print_table(result: dict[str, Any]) -> None:
    head = f"{'system':<20}{'conc':>5}{'reqs':>6}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
    print(f"\n{head}{'busy':>6}")
    for name, sysres in result["systems"].items():
        for lv in sysres["levels"]:
            print(
                f"{name:<20}{lv['concurrency']:>5}{lv['requests']:>6}{lv['tokens']:>8}{lv['tokens_per_s']:>9.1f}"
                f"{lv['ttft_ms']['p50']:>10.0f}{lv['ttft_ms']['p99']:>10.0f}{lv['machine_busy']:>6.0%}"
            )
    print("\ninferq ÷ peer, tokens/s:")
    for c, row in result["ratios"].items():
        cells = ", ".join(
            f"{k.removeprefix('tokens_per_s_vs_')} {v:.2f}×" for k, v in row.items() if "tokens" in k
        )
        print(f"  concurrency {c:>3}: {cells}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", default="1,4,16,64", help="Comma-separated levels.")
    parser.add_argument("--requests-per-level", type=int, default=16, help="At least --waves × concurrency.")
    parser.add_argument("--waves", type=int, default=2, help="Requests per level ≥ waves × concurrency.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--systems", default=",".join(systems.SYSTEMS))
    parser.add_argument("--max-batch", type=int, default=64, help="inferq worker --max-batch.")
    parser.add_argument("--naive-threads", type=int, default=1, help="Naive server's generate() threads.")
    parser.add_argument("--profile", default="", help="Systems to py-spy at --profile-concurrency.")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    add_quiet_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path("bench/out/logs"))
    parser.add_argument("--json", type=Path, help="Write the results here.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = demo_model()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.profile = [s for s in args.profile.split(",") if s]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "machine": describe(),
        "model": model_dir.name,
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests_per_level,
        "waves": args.waves,
        "concurrency": levels,
        "systems": {},
    }
    for name in [s for s in args.systems.split(",") if s]:
        print(f"{name}: starting…", flush=True)
        t0 = time.perf_counter()
        result["systems"][name] = measure_system(name, args, model_dir, levels)
        result["systems"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
    result["ratios"] = ratios(result)
    result["same_output_as_inferq_c1"] = same_outputs(result)
    print_table(result)
    write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
