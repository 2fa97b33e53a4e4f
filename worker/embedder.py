"""The embedding engine: one sentence-transformers model per worker, run with transformers' AutoModel and
the pooling and normalisation its directory declares (shared/embeddings.py reads them).

Jobs hand it their inputs as token ids and await their vectors. Whatever inputs are waiting when a
forward pass ends (from every job the worker holds) are sorted by length and cut into batches of similar
length, each at most `embed_batch_tokens` padded tokens, so short inputs are not padded to long ones;
inputs that arrive meanwhile wait for the next round. Forward passes run one at a time in the engine's
own thread, so the event loop keeps serving the queue, events and heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.capabilities import Capabilities, embedding_engine
from shared.embeddings import EmbeddingSpec, read_spec
from shared.settings import ModelSettings
from worker.engine import EngineStats

log = logging.getLogger(__name__)

INPUT_TOO_LONG = "input[{index}] is {tokens} tokens; the model takes at most {limit}"
TOKEN_OUT_OF_RANGE = "input[{index}] holds token id {token}, outside the vocabulary (0 to {last})"
# Rows of one forward pass, whatever their length: past this a CPU gains nothing from a bigger batch.
MAX_ROWS = 512


def embedding_spec(path: str) -> EmbeddingSpec | None:
    """The model's embedding declaration when `path` is a local sentence-transformers directory."""
    return read_spec(path) if Path(path).is_dir() else None


@dataclass(frozen=True)
class Precision:
    """How the embedding model computes: the dtype its weights load in, and whether its linear layers
    run in bfloat16 under autocast with everything else (embeddings, layer norms, residuals, pooling) in
    float32."""

    dtype: Any
    bf16_linear: bool
    why: str

    def describe(self) -> str:
        kind = (
            "float32, linear layers in bfloat16"
            if self.bf16_linear
            else str(self.dtype).removeprefix("torch.")
        )
        return f"{kind} ({self.why})"


def embedding_precision(name: str, device: str) -> Precision:
    """The `dtype` setting for an embedding model. A vector's quality is all an embedding model gives, so
    `auto` never runs the whole model in a 16-bit type on a CPU (bfloat16's 8-bit mantissa, carried
    through the residuals and layer norms, costs visible cosine similarity): where the CPU runs
    bfloat16 natively only the linear layers' products do (about twice as fast, cosine similarity to
    float32 above 0.99995, bench/RESULTS.md); float32 elsewhere; float16 on a GPU."""
    import torch

    from worker.model import native_cpu_bf16, resolve_dtype

    if name != "auto":
        dtype, why = resolve_dtype(name, device)  # a name given is taken as given, as for chat models
        return Precision(dtype, False, why)
    if device.startswith("cuda"):
        return Precision(torch.float16, False, f"auto: float16 on {device}")
    if device == "cpu":
        native, why = native_cpu_bf16()
        return Precision(torch.float32, native, f"auto: {why}")
    return Precision(torch.float32, False, f"auto: float32 on {device}")


def load_embedding_model(
    path: str, spec: EmbeddingSpec, settings: ModelSettings
) -> tuple[Any, Any, Precision]:
    """(model, tokenizer, precision) of the directory's Transformer module, on `settings.device`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from worker.model import _quiet_transformers

    _quiet_transformers()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    where = str(Path(path) / spec.transformer_path)
    tokenizer = AutoTokenizer.from_pretrained(where)
    precision = embedding_precision(settings.dtype, settings.device)
    log.info("embedding model dtype %s", precision.describe())
    model = AutoModel.from_pretrained(where, dtype=precision.dtype)
    if precision.bf16_linear:
        # Cast once here, so autocast finds the weights already in bfloat16 instead of casting them in
        # every forward pass.
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)
    return model.to(settings.device).eval(), tokenizer, precision


def vectors_module(model: Any, spec: EmbeddingSpec) -> Any:
    """The model with its pooling and normalisation, as one module: (input_ids, attention_mask) -> one
    float32 vector per row. What a trace records, and what runs eagerly where there is no trace."""
    import torch

    class Vectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = pool(hidden, attention_mask, spec.pooling)
            if spec.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.float()

    return Vectors().eval()


def _probe(rows: int, width: int, pad: int, vocab: int, seed: int) -> tuple[Any, Any]:
    """A right-padded batch of random tokens whose rows have different lengths."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(rows):
        length = width - (row * 3) % (width // 2)
        ids[row, length:] = pad
        mask[row, length:] = 0
    return ids, mask


def _unspecialised() -> Any:
    """TorchScript's executor without its profiling passes: a graph run as traced, not re-specialised
    (and its compilations kept) for every new batch shape."""
    from torch.jit._fuser import optimized_execution

    return optimized_execution(False)


def trace_embedding_model(vectors: Any, precision: Precision, pad: int, vocab: int) -> Any | None:
    """`vectors` (vectors_module: the model, its pooling and normalisation) traced into a TorchScript
    graph, or None where it cannot be (then the worker runs it eagerly).

    A traced forward pass is one call that holds Python's GIL only to start and end, where eager
    PyTorch takes the GIL back between every two of its hundreds of ops: in a worker whose event loop
    is busy with the queue, each of those waits could last Python's switch interval (5 ms), and the
    eager passes ran 2-3x slower than alone (bench/RESULTS.md). Alone it is faster too: no Python
    between the ops. The trace records the ops of one padded batch, autocast's casts included, and must
    give the eager model's output on a batch of another shape before it is used."""
    import torch

    for parameter in vectors.parameters():
        parameter.requires_grad_(False)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision.bf16_linear else contextlib.nullcontext()
    )
    jit_autocast = torch._C._jit_set_autocast_mode(False)  # the previous mode; now record autocast's casts
    try:
        ids, mask = _probe(4, 16, pad, vocab, seed=0)
        with torch.inference_mode(), autocast, _unspecialised(), warnings.catch_warnings():
            # It warns of every Python value it records as a constant (the check below is what counts),
            # and reading every attribute of the modules sets off their deprecation warnings.
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(vectors, (ids, mask), check_trace=False)  # type: ignore[no-untyped-call]
        ids, mask = _probe(3, 29, pad, vocab, seed=1)
        with torch.inference_mode(), _unspecialised():
            with autocast:
                expected = vectors(ids, mask)
            got = graph(ids, mask)
        if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), atol=1e-5):
            log.warning("the traced embedding model differs from the eager one; running it eagerly")
            return None
    except Exception as exc:
        log.warning("cannot trace the embedding model (%s); running it eagerly", exc)
        return None
    finally:
        torch._C._jit_set_autocast_mode(jit_autocast)
    return graph


def load_and_trace(
    path: str, spec: EmbeddingSpec, settings: ModelSettings
) -> tuple[Any, Any, Precision, Any | None]:
    """load_embedding_model, then, on a CPU with `trace_embedder` set, its traced graph (or None)."""
    model, tokenizer, precision = load_embedding_model(path, spec, settings)
    graph = None
    if settings.device == "cpu" and settings.trace_embedder:
        vectors = vectors_module(model, spec)
        graph = trace_embedding_model(vectors, precision, int(tokenizer.pad_token_id or 0), len(tokenizer))
    log.info("embedding model runs %s", "as a traced graph" if graph is not None else "eagerly")
    return model, tokenizer, precision, graph


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's own (BERT: [CLS] and [SEP]),
    found by tokenizing a probe with and without them (tokenizers expose no common call for it)."""
    probe = "inferq probe"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("cannot tell this tokenizer's special tokens apart from a text's")


def pool(hidden: Any, mask: Any, modes: tuple[str, ...]) -> Any:
    """sentence-transformers' pooling of one padded batch (right padding), each mode then concatenated."""
    import torch

    hidden = hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = torch.clamp(weights.sum(dim=1), min=1e-9)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            out.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * weights).sum(dim=1) / torch.sqrt(counts))
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            weighted = weights * positions.view(1, -1, 1)
            out.append((hidden * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":
            last = mask.sum(dim=1).long() - 1
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:  # read_spec refuses any other at load
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


@dataclass
class _Item:
    ids: list[int]
    future: asyncio.Future[np.ndarray[Any, Any]]


class Embedder:
    """What the rest of the worker asks of an engine (stats, health, capabilities, start and stop),
    for an embedding model, and `embed`, which the embedding job runner awaits."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        spec: EmbeddingSpec,
        settings: ModelSettings,
        precision: Precision | None = None,
        graph: Any | None = None,
    ) -> None:
        self.model = model
        self.graph = graph  # the model traced (trace_embedding_model), run in its place when set
        self._eager: Any = vectors_module(model, spec) if model is not None else None
        self.governor: Any = None  # a ThreadGovernor: ticked here when the graph runs (no module hooks)
        self.bf16_linear = precision is not None and precision.bf16_linear
        self.tokenizer = tokenizer
        self.spec = spec
        self.settings = settings
        self.stats = EngineStats()
        self.healthy = True
        self.step_observer: Any = None  # called with each forward pass's rows
        self._budget = settings.embed_batch_tokens
        self._pad = int(tokenizer.pad_token_id or 0)
        self._vocab = len(tokenizer)
        self._prefix, self._suffix = special_tokens_around(tokenizer)
        self._pending: list[_Item] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="inferq-embed")

    def capabilities(self) -> Capabilities:
        return embedding_engine(shortening=self.spec.shortening)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="inferq-embedder")

    def stop(self) -> None:
        """Called from a thread at shutdown (or on the loop): the running forward pass ends, no other
        starts, and the batching task is cancelled."""
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def cancel(self, request_id: str) -> None:
        """Nothing to stop: an input's forward pass is a fraction of a second (the runner drops the job)."""

    async def warmup(self) -> None:
        await self.embed([self.token_ids("warm up", 0)])

    # inputs -> token ids ------------------------------------------------------------------------------

    def token_ids(self, item: str | list[int], index: int) -> list[int]:
        """One input as the model reads it: a text tokenized, or given token ids wrapped in the model's
        special tokens, as the text's own would be. Never truncated: too long is an error."""
        if isinstance(item, str):
            ids = list(self.tokenizer(item, add_special_tokens=True)["input_ids"])
        else:
            for token in item:
                if not 0 <= token < self._vocab:
                    raise ValueError(
                        TOKEN_OUT_OF_RANGE.format(index=index, token=token, last=self._vocab - 1)
                    )
            ids = [*self._prefix, *item, *self._suffix]
        if len(ids) > self.spec.max_seq_length:
            raise ValueError(
                INPUT_TOO_LONG.format(index=index, tokens=len(ids), limit=self.spec.max_seq_length)
            )
        return ids

    def shorten(self, vectors: np.ndarray[Any, Any], dimensions: int | None) -> np.ndarray[Any, Any]:
        """Cut to `dimensions` (or the model's own truncate_dim); a normalising model's vectors are
        normalised again, so a shortened vector is a unit vector as OpenAI's are."""
        size = dimensions or self.spec.dimensions
        if size >= vectors.shape[1]:
            return vectors
        cut = vectors[:, :size]
        if self.spec.normalize:
            norms = np.linalg.norm(cut, axis=1, keepdims=True)
            cut = cut / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(cut, dtype=np.float32)

    # batching -----------------------------------------------------------------------------------------

    async def embed(self, rows: list[list[int]]) -> np.ndarray[Any, Any]:
        """The vectors of `rows` (token ids, special tokens included), one row each, float32."""
        assert self._wake is not None, "start() first"
        loop = asyncio.get_running_loop()
        items = [_Item(ids, loop.create_future()) for ids in rows]
        self._pending.extend(items)
        self._wake.set()
        self.stats.active += 1
        try:
            return np.stack(await asyncio.gather(*(i.future for i in items)))
        finally:
            self.stats.active -= 1

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        """Length-bucketed: sorted by length, cut where the padded batch would pass the token budget."""
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        for item in sorted(items, key=lambda i: len(i.ids)):
            # Sorted, so this item is the longest so far: the batch pads to its length.
            if current and ((len(current) + 1) * len(item.ids) > self._budget or len(current) >= MAX_ROWS):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            items, self._pending = self._pending, []
            for batch in self._batches([i for i in items if not i.future.done()]):
                try:
                    vectors = await loop.run_in_executor(self._pool, self._forward, [i.ids for i in batch])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("forward pass of %d inputs failed", len(batch))
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, row in zip(batch, vectors, strict=True):
                    if not item.future.done():
                        item.future.set_result(row)

    def _forward(self, rows: list[list[int]]) -> np.ndarray[Any, Any]:
        """One forward pass, in the engine's thread. Few torch calls: the event loop's thread may take
        the GIL at each (for up to Python's switch interval when it is busy), so the batch is built in
        numpy and the traced graph does the rest in one call."""
        import torch

        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        device = self.settings.device
        if device != "cpu":
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.inference_mode():
            if self.graph is not None:
                if self.governor is not None:
                    self.governor.tick()
                with _unspecialised():  # no re-specialising for each new shape
                    vectors = self.graph(input_ids, attention_mask)
            else:
                autocast = (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if self.bf16_linear
                    else contextlib.nullcontext()
                )
                with autocast:
                    vectors = self._eager(input_ids, attention_mask)
        self._count(rows)
        out: np.ndarray[Any, Any] = vectors.cpu().numpy()
        return out

    def _count(self, rows: list[list[int]]) -> None:
        """One forward pass of `rows` in the engine's stats and the batch-size metric."""
        self.stats.steps += 1
        self.stats.tokens += sum(len(r) for r in rows)
        self.stats.last_batch_size = len(rows)
        self.stats.peak_batch_size = max(self.stats.peak_batch_size, len(rows))
        if self.step_observer is not None:
            with contextlib.suppress(Exception):
                self.step_observer(len(rows))


async def start_embedder(ctx: dict[str, Any], settings: Any, path: str, spec: EmbeddingSpec) -> Embedder:
    """Load the model (in a daemon thread, as the chat model is: a stop during the load exits at once)
    and start the engine."""
    from worker import metrics
    from worker.cpu_threads import govern
    from worker.model import in_daemon_thread

    # Loaded and traced in the loading thread: torch's parallel work in the event loop's thread would
    # give it an OpenMP team of its own, and the engine thread's team would then sleep between ops.
    model, tokenizer, precision, graph = await in_daemon_thread(load_and_trace, path, spec, settings.model)
    governor = govern(
        model, settings.model.threads, metrics.cpu_threads.labels(settings.served_model_name).set
    )
    engine = Embedder(model, tokenizer, spec, settings.model, precision, graph)
    engine.governor = governor
    ctx["engine"] = engine
    engine.start()
    await engine.warmup()
    engine.step_observer = metrics.batch_size.labels(settings.served_model_name).observe
    log.info(
        "embedding model %s ready: %s pooling%s, %d dimensions, inputs up to %d tokens",
        settings.served_model_name,
        "+".join(spec.pooling),
        ", normalised" if spec.normalize else "",
        spec.dimensions,
        spec.max_seq_length,
    )
    return engine
