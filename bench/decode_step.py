"""Where one decode step of the built-in engine goes: the worker's Engine (transformers' continuous
batching with inferq's sampler) in-process, N concurrent requests of the bench prompts, each part of
the engine thread's step timed with wall-clock wrappers, over the steps in which every request decodes
one token (no prefill in the step). On a machine other processes share, wall-clock parts measure the
waits for a core as much as the work, so by default torch runs one thread here and every part is the
engine thread's own CPU time (`time.thread_time`): what the step costs, not how long it waited.
`--threads N --clock wall` measures wall-clock time with N threads instead (for a quiet machine).

    python -m bench decode-step [--concurrency 16] [--max-tokens 64] [--dtype auto] [--page-size N]
                                [--plain-weights] [--json A.json]
    python -m bench decode-step --compare A.json B.json   # greedy outputs of two runs, token for token

Parts: linear layers (every nn.Linear, the LM head included), attention (the attention function the
model calls: SDPA, the mask, grouped heads), the KV cache (writing the step's keys and values and
reading the batch's back), other model work (norms, rotary, activations, embedding and the modules'
Python), sampling (inferq's sampler and the runner's argmax), and the engine's Python around the
forward (scheduling, building the batch's tensors, updating the requests, handing outputs over).
The wrappers cost a few percent of a step themselves (they are counted in the step's total).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.harness import demo_model
from bench.throughput import PROMPTS

PARTS = ("linear", "attention", "kv_cache", "other_model", "sampling", "engine_python")


class StepTimer:
    """Per-step totals of each part, kept in the engine's thread."""

    def __init__(self, clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        self.current: dict[str, float] = defaultdict(float)
        self.decode_only = False
        self.batch = 0
        self.steps: list[dict[str, float]] = []
        self.all_steps = 0.0  # every step's time, prefill steps included
        self.q_tokens = 0  # tokens every step computed (prompt tokens a shared prefix skipped are not)
        self._depth: dict[str, int] = defaultdict(int)
        self.thread: int | None = None

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        # Only the outermost call of a part counts (an nn.Linear inside another part's timing still
        # counts as linear: parts are subtracted below, not nested).
        self._depth[name] += 1
        t0 = self.clock()
        try:
            yield
        finally:
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self.current[name] += self.clock() - t0

    def end_step(self, total: float, requests: int, q: int) -> None:
        if "forward" not in self.current:
            return  # no model step
        self.all_steps += total
        self.q_tokens += q
        if requests and q == requests:  # every request decodes one token
            step = dict(self.current)
            step["total"] = total
            step["batch"] = requests
            self.steps.append(step)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)

        return wrapped


def instrument(engine: Any, timer: StepTimer) -> None:
    import torch
    from transformers.generation.continuous_batching import continuous_api, model_runner
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = engine.model
    impl = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[impl] = timer.wrap("attention", ALL_ATTENTION_FUNCTIONS[impl])
    PagedAttentionCache.update = timer.wrap("kv_cache", PagedAttentionCache.update)  # type: ignore[method-assign]
    runner = model_runner.ModelRunner if hasattr(model_runner, "ModelRunner") else None
    if runner is not None:
        runner._sample = timer.wrap("sampling", runner._sample)  # type: ignore[attr-defined]
    sampler_cls = type(engine._manager.logit_processor) if engine._manager is not None else None
    if sampler_cls is not None:
        sampler_cls.__call__ = timer.wrap("sampling", sampler_cls.__call__)

    def pre(module: Any, args: Any) -> None:
        timer._depth["linear"] += 1
        if timer._depth["linear"] == 1:
            module._inferq_t0 = timer.clock()

    def post(module: Any, args: Any, out: Any) -> None:
        timer._depth["linear"] -= 1
        if timer._depth["linear"] == 0:
            timer.current["linear"] += timer.clock() - module._inferq_t0

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)

    def fpre(module: Any, args: Any, kwargs: Any) -> None:
        module._inferq_f0 = timer.clock()

    def fpost(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        timer.current["forward"] += timer.clock() - module._inferq_f0

    model.register_forward_pre_hook(fpre, with_kwargs=True)
    model.register_forward_hook(fpost, with_kwargs=True)

    body = continuous_api.ContinuousBatchingManager._generation_loop_body

    def loop_body(self: Any, batch_processor: Any, bootstrapping: bool) -> bool:
        timer.current = defaultdict(float)
        t0 = timer.clock()
        result = body(self, batch_processor, bootstrapping)
        total = timer.clock() - t0
        io = batch_processor.inputs_and_outputs
        requests = int(getattr(io, "num_request_in_batch", 0) or 0)
        timer.end_step(total, requests, int(getattr(io, "num_q_tokens", 0) or 0))
        return result

    continuous_api.ContinuousBatchingManager._generation_loop_body = loop_body  # type: ignore[method-assign]


def breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median ms per part over the steps; other_model and engine_python are what the parts leave over."""
    parts: dict[str, list[float]] = defaultdict(list)
    for s in steps:
        forward = s["forward"]
        measured = s.get("linear", 0) + s.get("attention", 0) + s.get("kv_cache", 0)
        parts["linear"].append(s.get("linear", 0))
        parts["attention"].append(s.get("attention", 0))
        parts["kv_cache"].append(s.get("kv_cache", 0))
        parts["other_model"].append(forward - measured)
        parts["sampling"].append(s.get("sampling", 0))
        parts["engine_python"].append(s["total"] - forward - s.get("sampling", 0))
        parts["total"].append(s["total"])
    return {k: round(statistics.median(v) * 1000, 2) for k, v in parts.items()}


async def greedy_round(
    engine: Any, tok: Any, tag: str, concurrency: int, max_tokens: int
) -> tuple[list[list[int]], int]:
    """`concurrency` greedy requests of the bench prompts (chat template applied) submitted at once to the
    worker's Engine; each request's generated tokens, and the prompt tokens of all of them."""
    from worker.engine import SamplingOptions

    handles = []
    prompt_tokens = 0
    for i in range(concurrency):
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
        prompt_tokens += len(ids)
        handles.append(engine.submit(f"{tag}-{i}", ids, SamplingOptions(max_tokens, 0.0, 1.0, None)))
    outputs: list[list[int]] = []
    for h in handles:
        tokens: list[int] = []
        while True:
            update = await h.next()
            tokens += update.new_tokens
            if update.finished:
                break
        outputs.append(tokens)
    return outputs, prompt_tokens


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from shared.settings import ModelSettings
    from worker.engine import Engine
    from worker.model import in_daemon_thread, load_model

    settings = ModelSettings(
        dtype=args.dtype,
        max_batch=max(args.concurrency, 16),
        threads=args.threads,
        page_size=args.page_size,
        pack_weights=not args.plain_weights,
    )
    # In a thread of its own, as the worker loads it (torch work in this, the event loop's, thread would
    # slow the engine thread's: worker/packed_linear.py).
    model, tok = await in_daemon_thread(load_model, str(demo_model()), settings)
    engine = Engine(model, tok, settings)
    engine.start()
    if args.attention == "sdpa":
        # transformers' own packed path, as before worker/attention.py (the engine installed it at start)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward
    timer = StepTimer(time.thread_time if args.clock == "cpu" else time.perf_counter)
    outputs: list[list[int]] = []  # each request's greedy tokens, to compare runs token for token
    prompt_tokens = 0
    try:
        await engine.warmup()
        instrument(engine, timer)
        for rnd in range(args.rounds):
            tokens, prompt = await greedy_round(engine, tok, f"r{rnd}", args.concurrency, args.max_tokens)
            outputs += tokens
            prompt_tokens += prompt
    finally:
        engine.stop()
    full = [s for s in timer.steps if s["batch"] == args.concurrency]
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "pack_weights": not args.plain_weights,
        "attention": args.attention,
        "threads": args.threads,
        "clock": args.clock,
        "concurrency": args.concurrency,
        "page_size": settings.page_size,
        "prompt_tokens": prompt_tokens,
        "tokens_computed": timer.q_tokens,  # prompt tokens computed + generated tokens (less the last ones)
        "all_steps_ms": round(timer.all_steps * 1000, 1),
        "decode_steps": len(full),
        "ms_per_step": breakdown(full) if full else {},
        "outputs": outputs,
    }


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How many requests' greedy outputs two runs share exactly, and where the others first differ."""
    pairs = list(zip(a["outputs"], b["outputs"], strict=True))
    where = [_first_divergence(x, y) for x, y in pairs]
    return {
        "identical": sum(w is None for w in where),
        "requests": len(pairs),
        "first_divergence": sorted(w for w in where if w is not None),
    }


def main(argv: list[str]) -> None:
    from shared.settings import ModelSettings

    if argv[:1] == ["--compare"] and len(argv) == 3:
        with open(argv[1]) as fa, open(argv[2]) as fb:
            print(json.dumps(compare(json.load(fa), json.load(fb))))
        return
    parser = argparse.ArgumentParser(prog="python -m bench decode-step", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--attention", default="decode", choices=["decode", "sdpa"], help="sdpa: transformers' packed path"
    )
    parser.add_argument(
        "--page-size", type=int, default=ModelSettings().page_size, help="KV-cache page (prefix sharing unit)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--plain-weights", action="store_true", help="plain linear weights (no worker/packed_linear.py)"
    )
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = asyncio.run(_run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
