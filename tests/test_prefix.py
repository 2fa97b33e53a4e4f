"""Prefix sharing in the built-in engine: a chat whose system prompt another chat ran before starts its
prefill after the pages it shares with that chat (transformers' paged cache reuses whole pages), and
answers what it answers alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.settings import ModelSettings
from worker.engine import Engine, RequestHandle, SamplingOptions
from worker.model import load_model

pytestmark = pytest.mark.asyncio(loop_scope="function")

# About 70 tokens with the chat template's own: shorter than the 256-token pages of before.
SYSTEM = (
    "You are the support assistant of a small bakery in Lyon. Answer in one short paragraph, "
    "politely, and only about the bakery: its bread, pastries, opening hours (Tuesday to Sunday, "
    "seven to one), prices and orders for events. Never invent a product."
)


def _chat(tokenizer: Any, question: str) -> list[int]:
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    return list(ids)


async def _tokens(handle: RequestHandle) -> list[int]:
    tokens: list[int] = []
    while True:
        update = await handle.next()
        assert update.error is None
        tokens += update.new_tokens
        if update.finished:
            return tokens


async def test_a_second_chat_with_the_same_short_system_prompt_reuses_the_first_ones_pages(
    model_dir: Path,
) -> None:
    settings = ModelSettings(dtype="float32", max_batch=4)  # the default page size
    model, tokenizer = await asyncio.to_thread(load_model, str(model_dir), settings)
    first = _chat(tokenizer, "Do you sell croissants?")
    second = _chat(tokenizer, "When are you open on Monday?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert 60 <= shared < 100, shared
    # Whole pages of the shared prefix, and never the prompt's last token (transformers computes it).
    reused = min(shared, len(second) - 1) // settings.page_size * settings.page_size

    out = model.generate(torch.tensor([second]), max_new_tokens=8, do_sample=False)
    expected = out[0, len(second) :].tolist()

    # Each forward pass: how many tokens it computed and the position of its first one.
    steps: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        steps.append((int(kwargs["input_ids"].shape[-1]), int(kwargs["position_ids"][0, 0])))

    engine = Engine(model, tokenizer, settings)
    engine.start()
    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        greedy = SamplingOptions(8, 0.0, 1.0, None)
        await _tokens(engine.submit("first", first, greedy))
        assert steps[0] == (len(first), 0)  # nothing cached yet: the whole prompt
        steps.clear()
        got = await _tokens(engine.submit("second", second, greedy))
    finally:
        hook.remove()
        engine.stop()

    # The second prompt's prefill started after the pages the first left in the cache: it computed only
    # what follows them.
    computed, start = steps[0]
    assert start >= 48, (start, settings.page_size)
    assert (computed, start) == (len(second) - reused, reused)
    assert got == expected
