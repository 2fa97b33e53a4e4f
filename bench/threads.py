"""The built-in engine's tokens/s by how torch's threads wait and how many run, with the cores free and
with one core busy with another process: the measurements behind worker/cpu_threads.py.

    python -m bench threads [--settings spin-2,governed] [--busy 0,1] [--rounds 3] [--json out.json]

Each setting runs in a fresh process (libgomp reads GOMP_SPINCOUNT when torch loads): the worker's
Engine in-process (its defaults otherwise: dtype auto, decode attention), warmed up, then `rounds` rounds
of `concurrency` greedy requests of the bench prompts, tokens/s per round. Settings:

  spin-2        two threads, GOMP_SPINCOUNT=200000 (libgomp's default is about 300,000)
  sleep-2       two threads, GOMP_SPINCOUNT=1000 (they sleep after 1,000 turns: the worker's old default)
  one-thread    one thread
  governed      what `inferq worker` runs: spinning, one thread per core others leave free

Each setting runs once per `--busy` fraction: beside another process that keeps one core busy that
fraction of the time (busy for that share of every 10 ms, asleep for the rest; 1: `while True`; 0: no
such process), started before the engine loads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.decode_step import greedy_round
from bench.harness import demo_model

SETTINGS: dict[str, tuple[str, int | None, bool]] = {  # GOMP_SPINCOUNT, threads, governed
    "spin-2": ("200000", 2, False),
    "sleep-2": ("1000", 2, False),
    "one-thread": ("200000", 1, False),
    "governed": ("200000", None, True),
}


async def _rounds(
    threads: int | None, governed: bool, concurrency: int, max_tokens: int, rounds: int
) -> dict[str, Any]:
    from shared.settings import ModelSettings
    from worker.cpu_threads import govern
    from worker.engine import Engine
    from worker.model import in_daemon_thread, load_model

    settings = ModelSettings(max_batch=concurrency, threads=threads)
    model, tok = await in_daemon_thread(load_model, str(demo_model()), settings)
    changes: list[int] = []
    if governed:
        govern(model, threads, changes.append)
    engine = Engine(model, tok, settings)
    engine.start()
    per_round: list[float] = []
    try:
        await engine.warmup()
        for rnd in range(rounds):
            t0 = time.perf_counter()
            outputs, _ = await greedy_round(engine, tok, f"r{rnd}", concurrency, max_tokens)
            tokens = sum(len(o) for o in outputs)
            per_round.append(round(tokens / (time.perf_counter() - t0), 1))
    finally:
        engine.stop()
    return {"tokens_per_s": per_round, "thread_changes": changes}


def _child(name: str, concurrency: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    spin, threads, governed = SETTINGS[name]
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ["GOMP_SPINCOUNT"] = spin  # before torch loads in this fresh process
    return asyncio.run(_rounds(threads, governed, concurrency, max_tokens, rounds))


_BUSY = """
import sys, time
share = float(sys.argv[1])
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < share * 0.01:
        pass
    if share < 1:
        time.sleep((1 - share) * 0.01)
"""


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "settings": {}}
    for busy in (float(b) for b in args.busy.split(",")):
        for name in args.settings.split(","):
            hog = subprocess.Popen([sys.executable, "-c", _BUSY, str(busy)]) if busy > 0 else None
            try:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    out = pool.submit(_child, name, args.concurrency, args.max_tokens, args.rounds).result()
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            where = f"another process busy {busy:g} of a core" if busy else "free cores"
            result["settings"].setdefault(name, {})[where] = out
            print(
                f"{name}, {where}: {out['tokens_per_s']} tokens/s, threads {out['thread_changes']}",
                flush=True,
            )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench threads", description=__doc__)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--busy", default="0,1", help="shares of a core another process keeps busy")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
