"""The three servers the throughput benchmark compares, each started fresh and ready on entry:
inferq (API + one worker), `transformers serve --continuous-batching`, and the naive server."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.chat_stream import chat_body
from bench.harness import SERVED_NAME, running_stack
from bench.machine import stack_markers
from bench.procs import free_port, server

SYSTEMS = ("inferq", "transformers-serve", "naive")


@dataclass
class Running:
    name: str
    base_url: str
    model: str  # what requests must name in `model`
    pids: dict[str, int] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)  # for machine.CpuByProcess


def answers_chat(base_url: str, model: str) -> Callable[[], bool]:
    """Ready means: a real (tiny, non-streamed) chat completion came back, so the model is loaded."""

    def check() -> bool:
        body = {**chat_body(model, "Hi", 2), "stream": False}
        body.pop("stream_options")
        return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120).status_code == 200

    return check


@contextlib.contextmanager
def inferq(model_dir: Path, *, max_batch: int, log_dir: Path) -> Iterator[Running]:
    env = {"INFERQ_AUTH": "off", "INFERQ_MAX_QUEUE_SECONDS": "100000"}
    with running_stack(model_dir, max_batch=max_batch, log_dir=log_dir, extra_env=env) as stack:
        answers_chat(stack.base_url, SERVED_NAME)()
        pids = {"api": stack.api_pid, "worker": stack.worker_pid or 0}
        config = {"max_batch": max_batch, "num_blocks": max_batch * 4, "max_batch_tokens": 512}
        markers = stack_markers(stack.redis_url, stack.database_url)
        yield Running("inferq", stack.base_url, SERVED_NAME, pids, config, markers)


def _transformers_cli() -> str:
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else (shutil.which("transformers") or "transformers")


@contextlib.contextmanager
def transformers_serve(model_dir: Path, *, max_batch: int, log_dir: Path) -> Iterator[Running]:
    """Pinned to the model directory, on the CPU, with the KV cache and step budget inferq's worker uses
    (transformers would otherwise size a CPU KV cache from free RAM)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    model = str(model_dir)
    blocks = max_batch * 4
    args = [
        _transformers_cli(),
        "serve",
        model,
        "--continuous-batching",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cb-num-blocks",
        str(blocks),
        "--cb-max-batch-tokens",
        "512",
        "--log-level",
        "warning",
    ]
    with server(
        args,
        ready=answers_chat(base, model),
        log=log_dir / "transformers-serve.log",
        what="transformers serve",
    ) as proc:
        config = {"num_blocks": blocks, "max_batch_tokens": 512, "command": " ".join(args[1:])}
        yield Running("transformers-serve", base, model, {"server": proc.pid}, config)


def vllm_python() -> Path:
    """The python of the vLLM environment `--engine vllm` makes on first use (the same pinned version);
    made here if missing (minutes)."""
    import asyncio

    from shared.settings import default_data_dir
    from worker.engines.vllm_server import ensure_env, env_dir

    device = "cpu"
    return asyncio.run(ensure_env(env_dir(default_data_dir(), device), device, lambda proc: None))


@contextlib.contextmanager
def vllm_direct(model_dir: Path, *, log_dir: Path, name: str = "vllm") -> Iterator[Running]:
    """vLLM's OpenAI server with its defaults (its CPU build: bfloat16), started the way `--engine vllm`
    starts it (same command, same KV cache space), serving the model under the bench's served name."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    args = [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_") and k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # what the worker's supervisor gives it
    with server(
        args,
        ready=answers_chat(base, SERVED_NAME),
        env=env,
        log=log_dir / "vllm.log",
        timeout=600,
        what="vLLM's OpenAI server",
    ) as proc:
        config = {"command": " ".join(args[1:]), "VLLM_CPU_KVCACHE_SPACE": env["VLLM_CPU_KVCACHE_SPACE"]}
        yield Running(
            name,
            base,
            SERVED_NAME,
            {"vllm": proc.pid},
            config,
            {"vllm": "vllm.entrypoints", "vllm engine": "VLLM::"},
        )


@contextlib.contextmanager
def naive(model_dir: Path, *, generate_threads: int, log_dir: Path) -> Iterator[Running]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--generate-threads",
        str(generate_threads),
    ]
    with server(
        args, ready=answers_chat(base, "naive"), log=log_dir / "naive.log", what="naive server"
    ) as proc:
        yield Running("naive", base, "naive", {"server": proc.pid}, {"generate_threads": generate_threads})


def start(
    name: str, model_dir: Path, *, max_batch: int, generate_threads: int, log_dir: Path
) -> contextlib.AbstractContextManager[Running]:
    if name == "inferq":
        return inferq(model_dir, max_batch=max_batch, log_dir=log_dir)
    if name == "transformers-serve":
        return transformers_serve(model_dir, max_batch=max_batch, log_dir=log_dir)
    if name == "naive":
        return naive(model_dir, generate_threads=generate_threads, log_dir=log_dir)
    raise ValueError(f"unknown system {name!r}; one of {', '.join(SYSTEMS)}")
