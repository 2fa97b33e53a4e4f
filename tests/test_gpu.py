"""The sampler's features on a CUDA worker: seed, logprobs and top_logprobs, top_k, n (several seeded
requests of one prompt) and structured-output masks run on the device the logits are on, with the
semantics CPU workers have. Skipped without a CUDA GPU; on CPU CI the same code paths run in
test_sampling.py, test_seed.py, test_logprobs.py and test_structured.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.capabilities import transformers_engine
from shared.settings import ModelSettings
from tests.test_sampling import _args, _sampler
from worker.engine import Engine, RequestHandle, SamplingOptions
from worker.grammar import forbidden
from worker.model import load_model
from worker.sampling import RequestExtras

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = "cuda:0"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def _sample(sampler: Any, scores: torch.Tensor, rows: list[tuple[float, int, float]]) -> torch.Tensor:
    """One sampler call on CUDA tensors; `rows`: each row's (temperature, top_k, top_p)."""
    ids = torch.zeros(scores.size(0), dtype=torch.long, device=CUDA)
    out: torch.Tensor = sampler(ids, scores, _args(rows).to(CUDA))
    return out


def test_gpu_sampler_greedy_rows_untouched_sampled_rows_follow_the_softmax() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=CUDA)
    draws = 20_000
    scores = logits.repeat(draws, 1)
    out = _sample(_sampler(), scores, [(1.0, 4, 1.0)] * draws)
    assert out.device.type == "cuda"
    freq = torch.bincount(out.argmax(-1), minlength=4).float().cpu() / draws
    assert torch.allclose(freq, torch.softmax(logits[0].cpu(), -1), atol=0.015)
    greedy = torch.randn(2, 100, device=CUDA)
    kept = _sample(_sampler(), greedy.clone(), [(1.0, 1, 1.0)] * 2)
    assert torch.equal(kept, greedy)


def test_gpu_sampler_seeded_row_does_not_depend_on_neighbours_and_logprobs_are_float32() -> None:
    torch.manual_seed(3)
    mine_logits = torch.randn(500, device=CUDA)

    def draws(row: int, rows: int) -> list[int]:
        sampler = _sampler()
        mine = RequestExtras.of(seed=1234, top_logprobs=2, device=CUDA)
        assert mine is not None and mine.generator is not None and mine.generator.device.type == "cuda"
        out = []
        for step in range(30):
            scores = (torch.randn(rows, 500, device=CUDA) * 3).to(torch.bfloat16)
            scores[row] = mine_logits.to(torch.bfloat16)
            sampler._extra_rows = [(row, step, mine)]
            picked = _sample(sampler, scores, [(1.0, 500, 1.0)] * rows)
            out.append(int(picked[row].argmax()))
        expected = torch.log_softmax(mine_logits.to(torch.bfloat16).float(), -1)
        assert [e.token for e in mine.logprobs] == out
        assert all(e.logprob == pytest.approx(float(expected[e.token]), abs=1e-6) for e in mine.logprobs)
        return out

    alone = draws(0, 1)
    assert len(set(alone)) > 5
    assert draws(2, 5) == alone


def test_gpu_grammar_mask_unpacked_on_the_device_matches_the_cpu() -> None:
    generator = torch.Generator().manual_seed(5)
    vocab = 49_152
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, vocab // 32), dtype=torch.int32, generator=generator)
    on_gpu = forbidden(bitmask, vocab, CUDA)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), forbidden(bitmask, vocab))


@pytest.fixture(scope="module")
async def engine(model_dir: Path) -> AsyncIterator[Engine]:
    settings = ModelSettings(device=CUDA, max_batch=8)
    model, tokenizer = await asyncio.to_thread(load_model, str(model_dir), settings)
    e = Engine(model, tokenizer, settings)
    e.start()
    try:
        yield e
    finally:
        e.stop()


async def _collect(handle: RequestHandle) -> tuple[list[int], list[Any]]:
    tokens: list[int] = []
    logprobs: list[Any] = []
    while True:
        update = await handle.next()
        assert update.error is None, update.error
        tokens += update.new_tokens
        logprobs += update.logprobs or []
        if update.finished:
            return tokens, logprobs


def _prompt(engine: Engine, text: str) -> list[int]:
    chat = [{"role": "user", "content": text}]
    ids = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


async def test_gpu_worker_declares_what_a_cpu_worker_does(engine: Engine) -> None:
    assert engine.capabilities() == transformers_engine("cpu")
    caps = engine.capabilities()
    assert caps.seed and caps.logprobs and caps.max_top_logprobs == 20 and caps.structured_outputs and caps.n


async def test_gpu_seed_n_logprobs_and_top_k(engine: Engine) -> None:
    ids = _prompt(engine, "Write a poem about the sea.")

    def options(seed: int | None, top_k: int | None = 50, top_logprobs: int | None = None) -> SamplingOptions:
        return SamplingOptions(24, 1.0, 1.0, top_k, seed=seed, top_logprobs=top_logprobs)

    # n = 3 as the worker runs it: seeds s, s+1, s+2, beside unseeded neighbours; twice.
    async def round_(tag: str) -> list[list[int]]:
        handles = [engine.submit(f"{tag}-{i}", ids, options(1234 + i)) for i in range(3)]
        handles += [engine.submit(f"{tag}-free-{i}", ids, options(None)) for i in range(2)]
        results = await asyncio.gather(*(_collect(h) for h in handles))
        return [tokens for tokens, _ in results[:3]]

    first = await round_("a")
    again = await round_("b")
    assert first == again
    assert len({tuple(t) for t in first}) == 3  # each output of n draws its own text

    # top_k = 1 is greedy: the same tokens as temperature 0, whatever the seed.
    greedy, greedy_lp = await _collect(
        engine.submit("greedy", ids, SamplingOptions(16, 0.0, 1.0, None, top_logprobs=5))
    )
    top1, _ = await _collect(engine.submit("top1", ids, options(7, top_k=1)))
    assert top1 == greedy
    # logprobs: one entry per token; the greedy token is the best of its top_logprobs, probabilities <= 1.
    assert [e.token for e in greedy_lp] == greedy
    for entry in greedy_lp:
        assert len(entry.top) == 5 and entry.top[0][0] == entry.token
        assert entry.logprob == pytest.approx(entry.top[0][1]) and entry.logprob <= 0.0


async def test_gpu_structured_output_follows_the_schema(engine: Engine) -> None:
    ids = _prompt(engine, "Give me a city and its population as JSON.")
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    handles = [
        engine.submit(f"json-{i}", ids, SamplingOptions(96, t, 1.0, None, response_format=response_format))
        for i, t in enumerate([0.0, 0.8, 1.2])
    ]
    plain = engine.submit("plain", ids, SamplingOptions(32, 0.8, 1.0, None))
    results = await asyncio.gather(*(_collect(h) for h in [*handles, plain]))
    for tokens, _ in results[:3]:
        value = json.loads(engine.tokenizer.decode(tokens, skip_special_tokens=True))
        assert set(value) == {"city", "population"} and isinstance(value["population"], int)
    assert results[3][0]  # the unconstrained neighbour ran in the same steps
