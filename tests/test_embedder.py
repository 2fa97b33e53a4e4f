"""The embedding engine in process: each pooling a sentence-transformers directory may declare gives the
vectors sentence-transformers gives, many inputs are packed into few forward passes, and a directory it
cannot serve as declared is refused at load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.embeddings import EmbeddingModelError, read_spec
from shared.settings import ModelSettings
from worker.embedder import Embedder, load_and_trace, trace_embedding_model

TEXTS = ["short", "a somewhat longer sentence about queues", "x " * 40, "embeddings for search"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from shared.settings import Settings
    from worker.model import fetch_embedding_model

    return fetch_embedding_model(Path(Settings().embedding_model_path))


def _variant(src: Path, dest: Path, pooling: dict[str, Any], normalize: bool, truncate: int | None) -> Path:
    """The model's directory with another pooling, normalisation or truncate_dim (weights linked)."""
    dest.mkdir()
    for item in src.iterdir():
        if item.is_file():
            (dest / item.name).symlink_to(item)
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    modules = json.loads((src / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (dest / "modules.json").unlink()
    (dest / "modules.json").write_text(json.dumps(modules))
    if truncate is not None:
        (dest / "config_sentence_transformers.json").unlink()
        (dest / "config_sentence_transformers.json").write_text(json.dumps({"truncate_dim": truncate}))
    return dest


# The pooling tests compare with sentence-transformers to float32's precision, so they run in float32;
# `dtype: auto` (bfloat16 linear layers where the CPU runs them natively) has its own tests below.
FLOAT32 = ModelSettings(dtype="float32")


async def _engine(path: Path, settings: ModelSettings = FLOAT32) -> AsyncIterator[Embedder]:
    spec = read_spec(path)
    assert spec is not None
    model, tokenizer, precision, graph = load_and_trace(str(path), spec, settings)
    assert (graph is not None) == settings.trace_embedder  # as a worker loads it: traced on a CPU
    engine = Embedder(model, tokenizer, spec, settings, precision, graph)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()
        await asyncio.sleep(0)  # the batching task's cancel runs


async def _ours(
    path: Path, texts: list[str], dimensions: int | None = None, settings: ModelSettings = FLOAT32
) -> Any:
    async with contextlib.asynccontextmanager(_engine)(path, settings) as engine:
        rows = [engine.token_ids(t, i) for i, t in enumerate(texts)]
        return engine.shorten(await engine.embed(rows), dimensions)


def _reference(path: Path, texts: list[str]) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts)


@pytest.mark.parametrize(
    ("pooling", "normalize"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, False),
        ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, True),
        ({"pooling_mode": "mean_sqrt_len_tokens"}, False),
        ({"pooling_mode": ["mean", "cls"]}, True),
        ({"pooling_mode": "lasttoken"}, False),
        ({"pooling_mode": "weightedmean"}, False),
    ],
)
async def test_embedder_pooling_matches_sentence_transformers(
    model_dir: Path, tmp_path: Path, pooling: dict[str, Any], normalize: bool
) -> None:
    path = _variant(model_dir, tmp_path / "m", pooling, normalize, None)
    ours = await _ours(path, TEXTS)
    want = _reference(path, TEXTS)
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)


async def test_embedder_packs_many_jobs_inputs_into_few_passes(model_dir: Path) -> None:
    texts = [f"input {i} " + "word " * (i % 7) for i in range(60)]
    async with contextlib.asynccontextmanager(_engine)(model_dir) as engine:
        jobs = [engine.embed([engine.token_ids(t, 0)]) for t in texts]
        vectors = np.concatenate(await asyncio.gather(*jobs))
        # 60 jobs of one input each: a handful of passes, not 60.
        assert engine.stats.steps <= 4 and engine.stats.peak_batch_size >= 30
    np.testing.assert_allclose(vectors, _reference(model_dir, texts), rtol=1e-4, atol=1e-5)


async def test_embedder_shortens_a_model_trained_for_it(model_dir: Path, tmp_path: Path) -> None:
    path = _variant(model_dir, tmp_path / "m", {"pooling_mode": "mean"}, True, 256)
    spec = read_spec(path)
    assert spec is not None and spec.shortening and spec.dimensions == 256 and spec.native_dimensions == 384
    default = await _ours(path, TEXTS)
    want = _reference(path, TEXTS)  # truncated to 256 by sentence-transformers itself
    assert default.shape == want.shape == (len(TEXTS), 256)
    cos = (default * want).sum(1) / np.linalg.norm(default, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999
    short = await _ours(path, TEXTS, dimensions=64)
    assert short.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-5)


def test_embedding_precision_auto_follows_the_device() -> None:
    import torch

    from worker.embedder import Precision, embedding_precision
    from worker.model import native_cpu_bf16

    assert embedding_precision("float32", "cpu") == Precision(
        torch.float32, False, "dtype float32 as configured"
    )
    assert embedding_precision("bfloat16", "cpu") == Precision(
        torch.bfloat16, False, "dtype bfloat16 as configured"
    )
    assert embedding_precision("auto", "cuda:0").dtype is torch.float16
    native, why = native_cpu_bf16()
    assert embedding_precision("auto", "cpu") == Precision(torch.float32, native, f"auto: {why}")


async def test_embedder_auto_dtype_keeps_cosine_similarity_to_sentence_transformers(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`dtype: auto`, what a worker runs by default: on a CPU with native bfloat16, the linear layers run
    in it (and their weights are held in it) while the rest stays float32; the vectors stay within the
    issue's cosine similarity of sentence-transformers' float32 ones, for short and long inputs."""
    import torch

    from worker.embedder import embedding_precision

    texts = [
        *TEXTS,
        *(
            f"document {i}: " + "queues and workers embed a corpus for search, " * (3 * i)
            for i in range(1, 8)
        ),
    ]
    precision = embedding_precision("auto", "cpu")
    with caplog.at_level(logging.INFO, logger="worker.embedder"):
        async with contextlib.asynccontextmanager(_engine)(model_dir, ModelSettings()) as engine:
            linear = [m.weight.dtype for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
            norms = [m.weight.dtype for m in engine.model.modules() if isinstance(m, torch.nn.LayerNorm)]
            assert set(norms) == {torch.float32}
            assert set(linear) == {torch.bfloat16 if precision.bf16_linear else torch.float32}
            rows = [engine.token_ids(t, i) for i, t in enumerate(texts)]
            assert max(len(r) for r in rows) > 200
            ours = engine.shorten(await engine.embed(rows), None)
    assert f"embedding model dtype {precision.describe()}" in caplog.text
    want = _reference(model_dir, texts)
    cos = (ours * want).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos


@pytest.mark.parametrize("dtype", ["float32", "auto"])
async def test_the_traced_graph_gives_the_eager_models_vectors(model_dir: Path, dtype: str) -> None:
    """The worker's default, a graph traced from one batch shape, against the model run eagerly, on
    batches of other sizes and lengths (3 to 254 tokens, padded and not)."""
    texts = [*TEXTS, *("queue " * n for n in (1, 3, 7, 20, 40, 80, 120, 160, 200, 230, 250, 252))]
    traced = ModelSettings.model_validate({"dtype": dtype})
    eager = ModelSettings.model_validate({"dtype": dtype, "trace_embedder": False})
    async with contextlib.asynccontextmanager(_engine)(model_dir, traced) as engine:
        assert engine.graph is not None
        rows = [engine.token_ids(t, i) for i, t in enumerate(texts)]
        assert min(len(r) for r in rows) <= 3 and max(len(r) for r in rows) == 254
        ours = [engine.shorten(await engine.embed(rows[i:j]), None) for i, j in ((0, 1), (0, 9), (3, 16))]
    async with contextlib.asynccontextmanager(_engine)(model_dir, eager) as engine:
        assert engine.graph is None
        want = [engine.shorten(await engine.embed(rows[i:j]), None) for i, j in ((0, 1), (0, 9), (3, 16))]
    for got, expected in zip(ours, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _shape_dependent() -> Any:
    """A model whose Python code branches on the batch's length: a trace keeps one branch only."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            scale = 2.0 if input_ids.shape[1] > 20 else 1.0
            return self.embed(input_ids) * scale

    return Model().eval()


def _untraceable() -> Any:
    import torch

    class Model(torch.nn.Module):
        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return input_ids.tolist()  # not a tensor: nothing to trace

    return Model().eval()


def test_a_model_the_trace_would_get_wrong_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    from worker.embedder import Precision

    float32 = Precision("float32", False, "test")
    with caplog.at_level(logging.WARNING, logger="worker.embedder"):
        assert trace_embedding_model(_shape_dependent(), float32, pad=0, vocab=100) is None
        assert "differs from the eager one; running it eagerly" in caplog.text
        assert trace_embedding_model(_untraceable(), float32, pad=0, vocab=100) is None
        assert "cannot trace the embedding model" in caplog.text


async def test_embedder_refuses_inputs_it_would_have_to_cut(model_dir: Path) -> None:
    async with contextlib.asynccontextmanager(_engine)(model_dir) as engine:
        _check_refusals(engine)


def _check_refusals(engine: Embedder) -> None:
    with pytest.raises(ValueError, match=r"input\[3\] is 302 tokens; the model takes at most 256"):
        engine.token_ids("word " * 300, 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.token_ids([5, 10**6], 0)
    assert engine.token_ids([7592, 2088], 0) == engine.token_ids("hello world", 0) == [101, 7592, 2088, 102]


def test_read_spec_refuses_what_it_cannot_serve(model_dir: Path, tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    shutil.copytree(model_dir, dense, ignore=shutil.ignore_patterns("*.safetensors"))
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(EmbeddingModelError, match="Dense is not supported"):
        read_spec(dense)
    odd = _variant(model_dir, tmp_path / "odd", {"pooling_mode": "median"}, True, None)
    with pytest.raises(EmbeddingModelError, match="pooling mode 'median' is not supported"):
        read_spec(odd)
    chat = tmp_path / "chat"
    chat.mkdir()
    assert read_spec(chat) is None  # no modules.json: not an embedding model
