"""`seed`: a seeded request draws from its own generator, so the same seed, prompt and parameters give
the same text whatever else shares the engine's batch; another seed gives another text.

That promise is made for float32 models (docs/sampling.md): in bfloat16 (dtype `auto` on CPUs with
AVX512-BF16 or AMX, and on GPUs) a change of batch moves the logits by far more than the draws can
absorb, and seeded texts part after some tokens. So the engine-level test runs on a float32 worker of
its own (a second served name on the session's servers), whatever `auto` picks on the machine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from openai import AsyncOpenAI

from tests.conftest import Proc, Stack, _free_port, live_workers, registry, start_api, wait_for
from tests.helpers import STORY
from tests.test_sampling import _args, _sampler
from worker.sampling import RequestExtras

MODEL = "smol-float32"
NEIGHBOURS = [
    "Name three rivers of Europe.",
    "Write a poem about the sea.",
    "Explain photosynthesis to a child.",
    "List some prime numbers.",
]


@pytest.fixture(scope="module")
def float32_api(stack: Stack, model_dir: Path) -> Iterator[str]:
    """An API that also serves MODEL, and a float32 worker of MODEL (its own queue: the session's worker
    serves the other name); both stop when the module ends."""
    url, api = start_api(stack, INFERQ_EXTRA_MODELS=json.dumps({MODEL: str(model_dir)}))
    env = {**stack.api.env, "INFERQ_MODEL__SERVED_NAME": MODEL, "INFERQ_MODEL__DTYPE": "float32"}
    worker = Proc(
        ["worker", "--max-batch", "16", "--metrics-port", str(_free_port())], env, stack.api.log_dir
    )
    worker.start()
    try:
        serving = lambda: any(w.get("model") == MODEL for w in registry(stack.servers.redis_url))  # noqa: E731
        wait_for(serving, 120, "the float32 worker", [api, worker])
        yield url
    finally:
        worker.stop()
        api.stop()
        # Other modules count the session's live workers: this one must be gone from the registry.
        wait_for(lambda: live_workers(stack.servers.redis_url) == 1, 60, "the float32 worker gone", [])


@pytest.fixture
async def oai(float32_api: str) -> AsyncIterator[AsyncOpenAI]:
    yield AsyncOpenAI(base_url=f"{float32_api}/v1", api_key="unused", max_retries=0, timeout=300)


def test_seed_a_seeded_rows_draws_do_not_depend_on_its_neighbours() -> None:
    """In the sampler itself: the same seed and logits give the same tokens, wherever the row sits in
    the batch and whatever the other rows are (seeded or not)."""
    torch.manual_seed(3)
    logits = torch.randn(1, 500)

    def draws(row: int, rows: int, neighbour_seed: int | None) -> list[int]:
        sampler = _sampler()
        mine = RequestExtras.of(seed=1234, top_logprobs=None)
        other = RequestExtras.of(seed=neighbour_seed, top_logprobs=None)
        assert mine is not None
        out = []
        for _ in range(40):
            scores = torch.randn(rows, 500) * 3
            scores[row] = logits[0]
            sampler._extra_rows = [(row, 0, mine)]
            if other is not None:
                sampler._extra_rows = [*sampler._extra_rows, ((row + 1) % rows, 0, other)]
            picked = sampler(torch.zeros(rows, dtype=torch.long), scores, _args([(1.0, 500, 1.0)] * rows))  # type: ignore[arg-type]
            out.append(int(picked[row].argmax()))
        return out

    alone = draws(0, 1, None)
    assert len(set(alone)) > 5  # really sampled
    assert draws(3, 6, None) == alone
    assert draws(1, 4, 99) == alone


async def _text(oai: AsyncOpenAI, content: str, seed: int | None, max_tokens: int = 32) -> str:
    completion = await oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
    )
    return completion.choices[0].message.content or ""


@pytest.mark.timeout(600)
async def test_seed_same_seed_gives_the_same_text_beside_other_jobs_and_another_seed_differs(
    oai: AsyncOpenAI,
) -> None:
    story = str(STORY[0]["content"])
    # First with two unseeded neighbours that start with it, then with three others that join it
    # mid-generation: the batch differs in size and content from step to step.
    first, *_ = await asyncio.gather(
        _text(oai, story, 1234), *(_text(oai, n, None, 24) for n in NEIGHBOURS[:2])
    )

    async def late(content: str, delay: float) -> str:
        await asyncio.sleep(delay)
        return await _text(oai, content, None, 40)

    second, *_ = await asyncio.gather(
        _text(oai, story, 1234), *(late(n, 0.3 * i) for i, n in enumerate(NEIGHBOURS[1:]))
    )
    other = await _text(oai, story, 4321)
    assert first
    assert second == first
    assert other != first
