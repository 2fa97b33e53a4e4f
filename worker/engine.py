"""One continuous-batching engine per worker: transformers' ContinuousBatchingManager, kept for life.

The manager runs model steps in its own thread. Every step's outputs reach the event loop in a
single callback (our OutputRouter), so many jobs share each forward pass and each step costs the
loop one wake-up, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import RequestStatus

from shared.capabilities import Capabilities, transformers_engine
from shared.settings import ModelSettings
from worker import attention, sampling
from worker.engines.base import EngineStats as EngineStats
from worker.grammar import Constraint, Grammars
from worker.sampling import RequestExtras, TokenLogprob

log = logging.getLogger(__name__)

# Below this, dividing the logits by the temperature overflows them: such requests run greedy (as in vLLM).
GREEDY_BELOW = 1e-5
STRUCTURED_UNAVAILABLE = (
    "response_format and tools cannot run on this worker: their grammars need a fast (Rust) tokenizer"
)


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    response_format: dict[str, Any] | None = None  # as stored in the job's request; None: plain text
    tool_grammar: str | None = None  # the grammar of the request's tools (shared/tools.py); None: none
    grammar_prefix: tuple[int, ...] = ()  # tokens the grammar has seen already (a retried job's text)
    seed: int | None = None  # the request draws from its own generator, seeded with this
    top_logprobs: int | None = None  # None: no logprobs; else that many alternatives per token

    def processor_kwargs(self, vocab_size: int) -> dict[str, Any]:
        if self.temperature < GREEDY_BELOW:
            # Greedy inside a sampling batch: top_k=1 reproduces generate(do_sample=False) token for token.
            # temperature=0 would divide by zero, so it stays 1.
            return {"top_k": 1, "temperature": 1.0, "top_p": 1.0}
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            # Past the vocabulary, top-k changes nothing; the engine packs it into int32.
            "top_k": min(int(self.top_k), int(vocab_size)) if self.top_k else int(vocab_size),
        }


@dataclass(slots=True)
class StepUpdate:
    new_tokens: list[int]
    batch_size: int
    finished: bool = False
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, for a request that asked for them


@dataclass
class RequestHandle:
    """What one job sees of its request: token updates as the engine produces them."""

    request_id: str
    extras: RequestExtras | None = None
    _queue: asyncio.Queue[StepUpdate] = field(default_factory=asyncio.Queue)
    _seen: int = 0
    closed: bool = False

    def _push(self, output: Any, batch_size: int) -> int:
        tokens = output.generated_tokens
        new = list(tokens[self._seen :])
        logprobs = None
        if self.extras is not None and self.extras.top_logprobs is not None:
            # The sampler wrote these in the step that produced the tokens, before the output was sent.
            logprobs = self.extras.logprobs[self._seen : len(tokens)]
        self._seen = len(tokens)
        failed = output.status == RequestStatus.FAILED or output.error is not None
        finished = bool(output.is_finished())
        error = output.error if failed else None
        self._queue.put_nowait(StepUpdate(new, batch_size, finished, error, logprobs))
        if finished:
            self.closed = True
        return len(new)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(StepUpdate([], 0, finished=True))

    async def next(self) -> StepUpdate:
        return await self._queue.get()


class _LoopRouter(OutputRouter):
    """Hands each step's outputs to the event loop in one call."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
        super().__init__()
        self._loop = loop
        self._engine = engine

    def deliver(self, output: Any) -> None:
        self._loop.call_soon_threadsafe(self._engine._on_step, [output])

    def deliver_batch(self, outputs: list[Any]) -> None:
        self._loop.call_soon_threadsafe(self._engine._on_step, list(outputs))


class Engine:
    def __init__(self, model: Any, tokenizer: Any, settings: ModelSettings) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.stats = EngineStats()
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._handles: dict[str, RequestHandle] = {}
        self._manager: Any = None
        self._grammars: Grammars | None = None
        # The constrained requests' matchers, read by the sampler in the engine's thread (single dict
        # operations, which the GIL keeps whole).
        self._constraints: dict[str, Constraint] = {}
        # Seeded requests' generators and logprobs requests' lists, likewise (sampling.RequestExtras).
        self._extras: dict[str, RequestExtras] = {}
        self.step_observer: Callable[[int], None] | None = None  # sees each step's batch size

    def start(self) -> None:
        """Build the manager and start its thread; call from the event loop that will consume outputs."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        # Per-request sampling needs every processor built: non-neutral defaults make transformers build
        # them, and each request then overrides the values.
        gen = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=True,
            temperature=0.7,
            top_p=0.95,
            top_k=50,
            max_new_tokens=256,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
        )
        cb = ContinuousBatchingConfig(
            per_request_processors=True,
            max_requests_per_batch=self.settings.max_batch,
            max_batch_tokens=self.settings.max_batch_tokens,
            num_blocks=self.settings.num_blocks or self._default_blocks(),
            page_size=self.settings.page_size,
            # Our sampler (below) reads which request each row is in prepare_tensor_args, then samples in
            # the same step, with a few host reads: a step captured in a CUDA graph, or the next batch
            # prepared while the current one runs (async batching), would break both. transformers
            # turns them on only with a flash attention kernel (the worker loads sdpa), so on CPUs and
            # on GPUs running sdpa this changes nothing.
            use_cuda_graph=False,
            use_async_batching=False,
        )
        if not str(self.model.device).startswith("cuda"):
            attention.install()  # decode steps attend each request to its own keys only
        init = self.model.init_continuous_batching
        manager = init(generation_config=gen, continuous_batching_config=cb)
        manager.output_router = _LoopRouter(asyncio.get_running_loop(), self)
        # The sampler runs on whatever device the logits are on, so CPU and GPU workers offer the same.
        sampling.install(manager, self._constraints, self._extras)
        self._grammars = self._build_grammars(eos[0] if isinstance(eos, list) else eos)
        manager.start()
        self._manager = manager

    def capabilities(self) -> Capabilities:
        """What this worker honours, once started: grammars need llguidance to have read the tokenizer."""
        return transformers_engine(str(self.model.device), grammars=self._grammars is not None)

    def _build_grammars(self, eos: int) -> Grammars | None:
        """llguidance's view of the tokenizer (about a second, once per worker); without it the worker
        still serves plain requests and fails constrained ones with the reason."""
        try:
            return Grammars(self.tokenizer, self.vocab_size, int(eos))
        except Exception as exc:
            log.warning("structured outputs are unavailable on this worker: %s", exc)
            return None

    def _default_blocks(self) -> int | None:
        # On a GPU transformers sizes the KV cache from free device memory. On a CPU that rule claims
        # gigabytes of RAM; a shared pool of 1,024 tokens per request slot, in pages, is plenty there.
        pages = -(-1024 // self.settings.page_size)
        return None if str(self.model.device).startswith("cuda") else self.settings.max_batch * pages

    async def warmup(self) -> None:
        """Run one tiny request so that the first real job does not pay for lazy initialisation."""
        ids = self.tokenizer.encode("Hello", add_special_tokens=True)
        handle = self.submit("inferq-warmup", list(ids), SamplingOptions(2, 0.0, 1.0, None))
        while not (await handle.next()).finished:
            pass

    @property
    def healthy(self) -> bool:
        return self._manager is not None and bool(self._manager.is_running())

    def submit(self, request_id: str, input_ids: list[int], options: SamplingOptions) -> RequestHandle:
        if self._manager is None:
            raise RuntimeError("engine not started")
        constraint = self._constraint(options)
        extras = RequestExtras.of(options.seed, options.top_logprobs, self.model.device)
        handle = RequestHandle(request_id, extras)
        self._handles[request_id] = handle
        self.stats.active = len(self._handles)
        if constraint is not None:
            self._constraints[request_id] = constraint
        if extras is not None:
            self._extras[request_id] = extras
        accepted = self._manager.add_request(
            input_ids,
            request_id=request_id,
            max_new_tokens=options.max_tokens,
            streaming=True,
            **options.processor_kwargs(self.vocab_size),
        )
        if accepted is None:
            self._forget(request_id)
            raise RuntimeError("the engine is not accepting requests")
        return handle

    def _constraint(self, options: SamplingOptions) -> Constraint | None:
        """The request's grammar matcher (built from a cached one); a schema that cannot be compiled
        raises, which fails the job with the reason rather than leaving it stuck."""
        if not options.response_format and not options.tool_grammar:
            return None
        if self._grammars is None:
            raise RuntimeError(STRUCTURED_UNAVAILABLE)
        if options.tool_grammar:
            return self._grammars.tool_constraint(options.tool_grammar, options.grammar_prefix)
        return self._grammars.constraint(options.response_format, options.grammar_prefix)

    def cancel(self, request_id: str) -> None:
        """Drop a request from the engine; its handle ends at once (the engine sends no final output)."""
        handle = self._handles.get(request_id)
        self._forget(request_id)
        if handle is None:
            return
        if self._manager is not None:
            self._manager.cancel_request(request_id)
        handle._close()

    def stop(self) -> None:
        if self._manager is not None:
            # A hard stop: whatever is still in the engine at this point goes back to the queue (the
            # drain is over), so nothing is worth finishing first; a flushing stop waits for the
            # requests in flight, which on a loaded machine outlasts the drain time (e.g. a SIGTERM
            # during the warm-up request).
            self._manager.stop(block=True, timeout=10, hard_stop=True)
            self._manager = None
        for rid in list(self._handles):
            self._handles.pop(rid)._close()
        self._constraints.clear()
        self._extras.clear()

    def _forget(self, request_id: str) -> None:
        self._handles.pop(request_id, None)
        self._constraints.pop(request_id, None)
        self._extras.pop(request_id, None)
        self.stats.active = len(self._handles)

    def _on_step(self, outputs: list[Any]) -> None:
        size = len(outputs)
        self.stats.steps += 1
        self.stats.last_batch_size = size
        self.stats.peak_batch_size = max(self.stats.peak_batch_size, size)
        if self.step_observer is not None:
            self.step_observer(size)
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is None:
                continue  # cancelled: its late tokens are dropped
            self.stats.tokens += handle._push(output, size)
            if handle.closed:
                self._forget(output.request_id)
        self.stats.active = len(self._handles)
