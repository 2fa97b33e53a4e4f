"""The built-in engine behind the engine contract (engines.base): a job's n outputs as requests in the
worker's continuous-batching engine (worker/engine.py), their tokens detokenized incrementally (stop
strings included), with the sampler's logprobs in shared.logprobs' shape.

A re-run job always continues: each output's published text is tokenized and replayed after the prompt,
counted as generated, and seen by its grammar (structured outputs, tools) as already matched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared import tools
from shared.prompts import prompt_token_ids
from shared.settings import ModelSettings
from shared.states import FinishReason
from shared.tool_parsers import parser_for
from worker.detok import IncrementalDecoder, TokenTexts
from worker.engine import Engine, RequestHandle, SamplingOptions
from worker.engines.base import GenerationJob, Outcome, TokenSink
from worker.sampling import TokenLogprob


class TransformersEngine(Engine):
    """worker/engine.py's engine, with the contract's generation on top."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, settings: ModelSettings) -> None:
        super().__init__(model, tokenizer, settings)
        self._token_texts: TokenTexts | None = None

    def continues(self, request: Mapping[str, Any]) -> bool:
        return True

    def generation(self, job: GenerationJob) -> TransformersGeneration:
        return TransformersGeneration(self, job)

    async def aclose(self) -> None:
        pass

    def token_texts(self) -> TokenTexts:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return self._token_texts

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])


@dataclass
class _Output:
    """One of a job's n outputs as it is generated."""

    index: int
    resume: str  # the text an earlier attempt published for it
    resumed: list[int]  # those tokens, which count as generated
    max_tokens: int
    options: SamplingOptions
    decoder: IncrementalDecoder
    handle: RequestHandle | None = None

    @property
    def text(self) -> str:
        return self.resume + self.decoder.text


class TransformersGeneration:
    def __init__(self, engine: TransformersEngine, job: GenerationJob) -> None:
        self.engine = engine
        self.job = job
        self.cancelled = False
        self.input_ids = prompt_token_ids(engine.tokenizer, job.request)
        self.outputs = [self._output(i) for i in range(job.n)]
        self._eos = engine.eos_ids()

    def _output(self, index: int) -> _Output:
        request, tokenizer = self.job.request, self.engine.tokenizer
        resume = self.job.resumes[index]
        # A retried job continues after the text it had: those tokens count as generated already.
        resumed = list(tokenizer.encode(resume, add_special_tokens=False)) if resume else []
        seed = request.get("seed")
        if seed is not None and index:
            seed = (int(seed) + index) % 2**63  # n outputs of one seed: n different, reproducible texts
        options = SamplingOptions(
            max_tokens=max(1, self.job.max_tokens - len(resumed)),
            temperature=float(request.get("temperature", 1.0)),
            top_p=float(request.get("top_p", 1.0)),
            top_k=request.get("top_k"),
            response_format=request.get("response_format"),
            tool_grammar=tools.request_grammar(request),
            grammar_prefix=tuple(resumed),
            seed=seed,
            top_logprobs=int(request.get("top_logprobs") or 0) if request.get("logprobs") else None,
        )
        decoder = IncrementalDecoder(tokenizer, request.get("stop"), context=resumed)
        return _Output(index, resume, resumed, self.job.max_tokens, options, decoder)

    async def run(self, sink: TokenSink) -> None:
        # The outputs after the first start once its prompt is in the engine's cache, whose full pages
        # they then share (prefix sharing) instead of computing the prompt n times; a prompt shorter
        # than a page has none to share, so they start with it.
        prefilled = asyncio.Event()
        share = len(self.input_ids) > self.engine.settings.page_size  # its last token is always computed
        tasks = [
            asyncio.create_task(self._decode(out, sink, prefilled, wait=share and out.index > 0))
            for out in self.outputs
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One output failed (or the worker stops): the others end now, before the job's end.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def cancel(self) -> None:
        """Make the engine drop the job's requests that still run."""
        self.cancelled = True
        for out in self.outputs:
            if out.handle is not None and not out.handle.closed:
                self.engine.cancel(out.handle.request_id)

    async def _decode(self, out: _Output, sink: TokenSink, prefilled: asyncio.Event, *, wait: bool) -> None:
        """Run one output in the engine; `prefilled` is set once the first output has its first token
        (or ended), which is when the others start if `wait`."""
        try:
            if len(out.resumed) >= out.max_tokens:
                return  # max_tokens used up by the text it continues from
            if wait:
                await prefilled.wait()
            if self.cancelled:
                return
            suffix = f"/{out.index}" if self.job.n > 1 else ""
            ids = self.input_ids + out.resumed
            out.handle = self.engine.submit(f"{self.job.key}{suffix}", ids, out.options)
            await self._stream(out, out.handle, sink, prefilled)
        finally:
            prefilled.set()
        sink.end(out.index, out.decoder.finish())

    async def _stream(
        self, out: _Output, handle: RequestHandle, sink: TokenSink, prefilled: asyncio.Event
    ) -> None:
        decoder = out.decoder
        while not self.cancelled:
            update = await handle.next()
            if out.index == 0:
                prefilled.set()
            if update.error:
                raise RuntimeError(update.error)
            consumed = len(decoder.token_ids)
            text = decoder.push(update.new_tokens)
            logprobs = None
            if update.logprobs is not None:
                # The decoder takes tokens from the front and stops at a stop string: its share.
                consumed = len(decoder.token_ids) - consumed
                logprobs = self._logprob_dicts(update.logprobs[:consumed])
            sink.tokens(out.index, text, logprobs, len(update.new_tokens), update.batch_size)
            if decoder.stopped:
                self.engine.cancel(handle.request_id)
                break
            if update.finished:
                break

    def _logprob_dicts(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """The sampler's entries as shared.logprobs.TokenLogprob dicts; the end-of-sequence token that
        ends a generation is not one of the answer's tokens (nor at OpenAI)."""
        texts = self.engine.token_texts()
        out = []
        for entry in entries:
            if entry.token in self._eos:
                continue
            token, raw = texts(entry.token)
            top = []
            for alt, logprob in entry.top:
                alt_token, alt_raw = texts(alt)
                top.append({"token": alt_token, "logprob": logprob, "bytes": alt_raw})
            out.append({"token": token, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top})
        return out

    def outcome(self) -> Outcome:
        generated = sum(len(o.decoder.token_ids) for o in self.outputs)
        return Outcome(
            reasons=[self._reason(o) for o in self.outputs],
            prompt_tokens=len(self.input_ids),
            completion_tokens=generated + sum(len(o.resumed) for o in self.outputs),
            generated=generated,
        )

    def _reason(self, out: _Output) -> FinishReason:
        decoder = out.decoder
        if out.handle is None and out.resumed:  # the text it continues from had used up max_tokens
            return FinishReason.LENGTH
        if decoder.stopped or (decoder.token_ids and decoder.token_ids[-1] in self._eos):
            return self._stopped(out)
        if len(decoder.token_ids) >= out.options.max_tokens:
            return FinishReason.LENGTH
        return self._stopped(out)

    def _stopped(self, out: _Output) -> FinishReason:
        """An answer that ended by itself: `tool_calls` when it made calls (as OpenAI says it)."""
        if tools.calls_allowed(self.job.request):
            if parser_for(self.engine.tokenizer.chat_template).extract(out.text).calls:
                return FinishReason.TOOL_CALLS
        return FinishReason.STOP
