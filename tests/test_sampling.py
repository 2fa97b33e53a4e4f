"""The worker's batch sampler: greedy rows are exact argmax, sampled rows follow softmax(processed
logits), and a mixed batch in the real engine decodes greedy requests exactly as `generate` does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)

from shared.settings import ModelSettings
from worker.engine import Engine, SamplingOptions
from worker.model import load_model
from worker.sampling import BatchSampler


def _sampler() -> BatchSampler:
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.95)]
    )
    cb = ContinuousBatchingLogitsProcessorList(warpers, per_request_processors=True)
    cb.__class__ = BatchSampler
    assert isinstance(cb, BatchSampler)
    return cb


def _args(rows: list[tuple[float, int, float]]) -> torch.Tensor:
    """Per-row (temperature, top_k, top_p) packed the way transformers packs them (int32 storage)."""
    temps = torch.tensor([r[0] for r in rows], dtype=torch.float32).view(torch.int32)
    ks = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    ps = torch.tensor([r[2] for r in rows], dtype=torch.float32).view(torch.int32)
    return torch.stack([temps, ks, ps])


def _draw(sampler: BatchSampler, scores: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    ids = torch.zeros(scores.size(0), dtype=torch.long)
    return sampler(ids, scores, args).argmax(-1)  # type: ignore[arg-type]


def test_greedy_rows_are_left_untouched_and_sampled_rows_become_one_token() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 100)
    out = _sampler()(
        torch.zeros(3, dtype=torch.long),
        scores.clone(),
        _args([(1.0, 1, 1.0), (1.0, 100, 1.0), (1.0, 1, 1.0)]),
    )  # type: ignore[arg-type]
    assert torch.equal(out[0], scores[0]) and torch.equal(out[2], scores[2])
    assert int(torch.isfinite(out[1]).sum()) == 1


def test_sampled_rows_follow_the_softmax() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 20_000
    scores = logits.repeat(draws, 1)
    tokens = _draw(_sampler(), scores, _args([(1.0, 4, 1.0)] * draws))
    freq = torch.bincount(tokens, minlength=4).float() / draws
    expected = torch.softmax(logits[0], -1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_temperature_top_k_and_top_p_shape_the_distribution() -> None:
    torch.manual_seed(2)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    n = 5_000
    scores = logits.repeat(n, 1)
    top2 = _draw(_sampler(), scores, _args([(1.0, 2, 1.0)] * n))
    assert set(top2.tolist()) == {0, 1}
    # softmax([3,2,1,0,-1]) = .64,.24,.09,.03,.01: top_p 0.7 keeps the first two tokens only
    nucleus = _draw(_sampler(), scores, _args([(1.0, 5, 0.7)] * n))
    assert set(nucleus.tolist()) == {0, 1}
    cold = _draw(_sampler(), scores, _args([(0.05, 5, 1.0)] * n))
    assert (cold == 0).float().mean() > 0.999
    hot = _draw(_sampler(), scores, _args([(100.0, 5, 1.0)] * n))
    assert torch.bincount(hot, minlength=5).min() > n / 5 * 0.8  # nearly uniform


@pytest.mark.asyncio(loop_scope="function")
async def test_greedy_requests_in_a_sampling_batch_decode_exactly_like_generate(model_dir: Path) -> None:
    settings = ModelSettings(max_batch=8)
    model, tokenizer = await asyncio.to_thread(load_model, str(model_dir), settings)
    prompts = ["The capital of France is", "Water boils at", "One, two, three,"]
    expected = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        expected.append(out[0, ids.shape[1] :].tolist())
    engine = Engine(model, tokenizer, settings)
    engine.start()
    try:
        handles = []
        for i, text in enumerate(prompts):
            ids = tokenizer(text).input_ids
            handles.append(engine.submit(f"greedy-{i}", ids, SamplingOptions(12, 0.0, 1.0, None)))
            # hot sampled neighbours in the same steps
            handles.append(engine.submit(f"hot-{i}", ids, SamplingOptions(12, 1.5, 0.9, 40)))

        async def collect(handle: object) -> list[int]:
            tokens: list[int] = []
            while True:
                update = await handle.next()  # type: ignore[attr-defined]
                tokens += update.new_tokens
                if update.finished:
                    return tokens

        results = await asyncio.gather(*(collect(h) for h in handles))
    finally:
        engine.stop()
    assert engine.stats.peak_batch_size > 1
    for i in range(len(prompts)):
        assert results[2 * i] == expected[i]
        assert len(results[2 * i + 1]) > 0


def test_sampler_computes_in_float32_when_the_logits_are_bfloat16() -> None:
    """A bfloat16 model's logits are upcast before the sampler's log-softmax: the logprobs are float32's,
    not bfloat16's (about 3 significant digits), and the rows it returns are float32."""
    from worker.sampling import RequestExtras

    torch.manual_seed(4)
    scores = (torch.randn(2, 1000) * 4).to(torch.bfloat16)
    extras = RequestExtras.of(seed=None, top_logprobs=3)
    assert extras is not None
    sampler = _sampler()
    sampler._extra_rows = [(1, 0, extras)]
    out = sampler(torch.zeros(2, dtype=torch.long), scores.clone(), _args([(1.0, 1, 1.0)] * 2))  # type: ignore[arg-type]
    assert out.dtype == torch.float32
    expected = torch.log_softmax(scores[1].float(), dim=-1)
    token = int(expected.argmax())
    (entry,) = extras.logprobs
    assert entry.token == token
    assert entry.logprob == float(expected[token])
    best = torch.topk(expected, 3)
    assert entry.top == list(zip(best.indices.tolist(), best.values.tolist(), strict=True))


def test_grammar_bitmask_unpacked_with_torch_ops_matches_numpy() -> None:
    """The unpacking a GPU worker runs on its device (torch shifts), checked here on CPU tensors against
    the numpy unpacking CPU workers use, on random words (sign bit included) and a vocabulary that ends
    inside a word."""
    from worker.grammar import forbidden, forbidden_torch

    generator = torch.Generator().manual_seed(5)
    vocab = 49_152 - 7
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    bitmask[0] = -1  # every token allowed
    expected = forbidden(bitmask, vocab)
    got = forbidden_torch(bitmask, vocab)
    assert got.dtype == torch.bool and got.shape == (3, vocab)
    assert torch.equal(got, expected)
    assert not bool(got[0].any())
    # Bit i of word w is token 32w + i; a set bit allows it.
    assert bool(got[1, 33]) == (not (int(bitmask[1, 1]) >> 1) & 1)
