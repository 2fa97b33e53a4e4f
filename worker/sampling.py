"""Per-request sampling for continuous batching on CPU, without paying for it on greedy rows.

transformers' per-request path runs every processor (temperature, a full-vocabulary sort for top-k,
another for top-p) on every row of the batch, then a softmax and `torch.multinomial` over all of it,
even for rows that asked for greedy decoding. On a CPU that is a tenth of a small model's step.

`BatchSampler` replaces the processor list's `__call__` (the engine then runs the model runner with
`do_sample=False`, so the next token is the argmax of what this returns):

- greedy rows (top_k == 1, which the engine sets for them) are returned untouched, so the argmax
  is exactly `generate(do_sample=False)`'s token;
- the other rows go through temperature, top-k (`torch.topk` of only the largest k asked for) and
  top-p (skipped when no row asked for it), are sampled from the softmax, and come back as a row
  that is -inf everywhere except the sampled token.

So each token is drawn from the same distribution as in transformers, and the cost scales with the
rows that sample. Everything runs on the device the logits are on (a CPU or a CUDA GPU), in float32
whatever the model's dtype: the engine hands over float32 logits, and the sampler upcasts any that are
not, so logprobs keep float32's precision under a bfloat16 model. The per-request values it needs on
the host (which rows sample, their largest k) cost a few small device-to-host reads per step.

Structured outputs ride on the same call: the rows of requests with a grammar (`constraints`, by
request id) get their llguidance token mask applied first, so that a greedy row's token is exactly
the argmax of its masked logits and a sampled row samples among the allowed tokens. Which row is which
request is known from `prepare_tensor_args`, which the batch processor calls with the step's requests
in row order (only those that get a new token have a row); there each matcher also catches up with the
tokens its request was given in the step before, so it never lags the engine.

Seeds and logprobs ride on it too, for the requests registered in `extras` (by request id):
- a seeded request draws with its own `torch.Generator`, seeded when the request starts and advanced
  by its own draws only, one row at a time, so its draws do not depend on what shares the batch (the
  logits themselves can differ in their last bits with the batch's size: see docs/sampling.md);
- a request that asked for logprobs gets, for each token, the log-softmax of the model's logits (after
  its grammar mask, before temperature, top-k and top-p) at the chosen token and its `top_logprobs`
  best tokens, appended in the engine's thread to the request's own list, which the event loop reads
  when the step's output arrives (the token is then in the output, so its entry is already there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)

from worker import grammar


def _top_k(scores: torch.Tensor, top_k: torch.Tensor, filter_value: float) -> torch.Tensor:
    vocab = scores.size(-1)
    top_k = top_k.to(torch.int64)
    active = top_k < vocab
    if not bool(active.any()):
        return scores
    k_max = int(top_k[active].max())
    values = torch.topk(scores, k_max, dim=-1).values
    thresholds = values.gather(-1, (top_k.clamp(min=1, max=k_max) - 1).unsqueeze(-1))
    thresholds = torch.where(active.unsqueeze(-1), thresholds, torch.full_like(thresholds, -float("inf")))
    return scores.masked_fill(scores < thresholds, filter_value)


class TokenLogprob(NamedTuple):
    """One generated token's log-probability and the best `top_logprobs` tokens at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class RequestExtras:
    """What one request asked of the sampler beyond temperature, top-k and top-p."""

    generator: torch.Generator | None = None  # its own draws, for a seeded request
    top_logprobs: int | None = None  # None: no logprobs; 0..20: that many alternatives per token
    # By position in the request's generated tokens: written in the engine's thread, read in the loop's.
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def of(
        cls, seed: int | None, top_logprobs: int | None, device: torch.device | str = "cpu"
    ) -> RequestExtras | None:
        """`device`: where the logits are, so the seeded generator draws there (torch.multinomial needs
        its generator on the probabilities' device)."""
        if seed is None and top_logprobs is None:
            return None
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        return cls(generator, top_logprobs)

    def record(self, position: int, entry: TokenLogprob) -> None:
        if position < len(self.logprobs):
            self.logprobs[position] = entry
        else:
            self.logprobs.append(entry)


def _earlier(state: Any) -> list[int]:
    """The tokens a request generated before the engine restarted it (offloaded it without room to keep
    its cache: a soft reset), which then sit at the end of its prompt; none for a request never restarted."""
    return state.initial_tokens[state._true_initial_tokens :] if state._true_initial_tokens else []


def generated_count(state: Any) -> int:
    """How many tokens a request has generated, as its outputs count them (earlier ones included)."""
    return len(_earlier(state)) + len(state.generated_tokens)


def generated_tail(state: Any, n: int) -> list[int]:
    """The last `n` tokens a request generated. After a soft reset these can start in its prompt: the token
    drawn in the step before the restart was not yet given to its grammar, and is then no longer among
    `generated_tokens`."""
    if n <= 0:
        return []
    recent = state.generated_tokens
    if n <= len(recent):
        return list(recent[len(recent) - n :])
    earlier = _earlier(state)
    return list(earlier[max(0, len(earlier) - (n - len(recent))) :]) + list(recent)


class BatchSampler(ContinuousBatchingLogitsProcessorList):
    # Set by install(): the class is swapped on a built instance, so no __init__ of ours runs. The
    # class-level defaults (no constraint, no constrained row) hold for an instance install() never saw.
    constraints: Mapping[str, grammar.Constraint] = MappingProxyType({})
    extras: Mapping[str, RequestExtras] = MappingProxyType({})
    _rows: Sequence[grammar.Constraint | None] = ()
    _extra_rows: Sequence[tuple[int, int, RequestExtras]] = ()  # (row, token position, extras)

    def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: torch.Tensor) -> torch.Tensor:
        rows: list[grammar.Constraint | None] = []
        extra_rows: list[tuple[int, int, RequestExtras]] = []
        if self.constraints or self.extras:
            row = 0
            for future in requests_in_batch:
                if not future.has_new_token:
                    continue  # still prefilling: no logits row this step
                request_id = future.state.request_id
                constraint = self.constraints.get(request_id)
                extras = self.extras.get(request_id)
                if constraint is not None or extras is not None:
                    generated = generated_count(future.state)
                    if constraint is not None:
                        new = generated_tail(future.state, generated - constraint.consumed)
                        constraint.catch_up(new, generated)
                    if extras is not None:
                        extra_rows.append((row, generated, extras))
                rows.append(constraint)
                row += 1
        self._rows = rows if any(c is not None for c in rows) else ()
        self._extra_rows = extra_rows
        return super().prepare_tensor_args(requests_in_batch, arg_storage)

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        """-inf on the tokens each constrained row's grammar forbids; the other rows are not touched."""
        picked = [(row, c) for row, c in enumerate(self._rows[: scores.size(0)]) if c is not None]
        if not picked:
            return scores
        vocab = scores.size(-1)
        # llguidance writes the packed masks into host memory; they go to the logits' device packed
        # (32 tokens a word) and are unpacked there.
        bitmask = torch.full((len(picked), (vocab + 31) // 32), -1, dtype=torch.int32)
        for j, (_, constraint) in enumerate(picked):
            grammar.fill(constraint, bitmask, j)
        forbidden = grammar.forbidden(bitmask, vocab, scores.device)
        if len(picked) == scores.size(0):
            return scores.masked_fill_(forbidden, -float("inf"))  # every row: in place, no copies
        index = torch.tensor([row for row, _ in picked], device=scores.device)
        scores[index] = scores[index].masked_fill(forbidden, -float("inf"))
        return scores

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.Tensor, logits_processor_args: torch.Tensor
    ) -> torch.Tensor:
        rows = scores.size(0)
        if scores.dtype != torch.float32:
            # transformers' runner upcasts the logits already; this keeps the sampler's log-softmax,
            # temperature and top-p in float32 if one ever hands it a half-precision row.
            scores = scores.float()
        if self._rows:
            scores = self._mask(scores)
        args: dict[type, tuple[ContinuousBatchingLogitsProcessor, torch.Tensor]] = {}
        i = 0
        for processor in self.logits_processor:
            if isinstance(processor, ContinuousBatchingLogitsProcessor):
                args[type(processor)] = (processor, logits_processor_args[i][:rows])
                i += 1
            else:
                scores = processor(input_ids, scores)  # batch-wide processors apply to every row
        extra_rows = [e for e in self._extra_rows if e[0] < rows]
        top_k = args.get(ContinuousBatchingTopKLogitsWarper)
        if top_k is None:
            sampled = torch.arange(rows, device=scores.device)
        else:
            sampled = (top_k[1] != 1).nonzero().squeeze(-1)
        if sampled.numel() == 0:
            self._record_logprobs(scores, extra_rows, {})
            return scores
        sub = scores[sampled]
        temperature = args.get(ContinuousBatchingTemperatureLogitsWarper)
        if temperature is not None:
            sub = sub / temperature[1][sampled].view(dtype=torch.float32).unsqueeze(-1)
        if top_k is not None:
            sub = _top_k(sub, top_k[1][sampled], float(getattr(top_k[0], "filter_value", -float("inf"))))
        top_p = args.get(ContinuousBatchingTopPLogitsWarper)
        if top_p is not None:
            values = top_p[1][sampled]
            if bool((values.view(dtype=torch.float32) < 1.0).any()):
                sub = top_p[0](sub, values)
        tokens = self._draw(torch.softmax(sub, dim=-1), sampled, extra_rows)
        if extra_rows:
            drawn = dict(zip(sampled.tolist(), tokens.squeeze(-1).tolist(), strict=True))
            self._record_logprobs(scores, extra_rows, drawn)
        onehot = torch.full_like(sub, -float("inf")).scatter_(-1, tokens, 0.0)
        scores = scores.clone()
        scores[sampled] = onehot
        return scores

    @staticmethod
    def _draw(
        probs: torch.Tensor, sampled: torch.Tensor, extra_rows: Sequence[tuple[int, int, RequestExtras]]
    ) -> torch.Tensor:
        """One token per sampled row: a seeded request's from its own generator, on its row alone (so
        nothing else in the batch moves its draws); the others in one call on the global generator."""
        seeded = {row: e.generator for row, _, e in extra_rows if e.generator is not None}
        if not seeded:
            return torch.multinomial(probs, num_samples=1)
        tokens = torch.empty((probs.size(0), 1), dtype=torch.int64, device=probs.device)
        free = []
        for j, row in enumerate(sampled.tolist()):
            generator = seeded.get(row)
            if generator is None:
                free.append(j)
            else:
                tokens[j] = torch.multinomial(probs[j], num_samples=1, generator=generator)
        if free:
            index = torch.tensor(free, device=probs.device)
            tokens[index] = torch.multinomial(probs[index], num_samples=1)
        return tokens

    @staticmethod
    def _record_logprobs(
        scores: torch.Tensor, extra_rows: Sequence[tuple[int, int, RequestExtras]], drawn: dict[int, int]
    ) -> None:
        """Log-softmax of the rows that asked for logprobs only; a greedy row's token is its argmax (what
        the model runner then picks), a sampled row's the one drawn."""
        wanted = [(row, pos, e) for row, pos, e in extra_rows if e.top_logprobs is not None]
        if not wanted:
            return
        index = torch.tensor([row for row, _, _ in wanted], device=scores.device)
        logprobs = torch.log_softmax(scores[index], dim=-1)
        k = max(int(e.top_logprobs or 0) for _, _, e in wanted)
        top = torch.topk(logprobs, k, dim=-1) if k else None
        for j, (row, pos, extras) in enumerate(wanted):
            token = drawn.get(row)
            if token is None:
                token = int(torch.argmax(scores[row]))
            n = int(extras.top_logprobs or 0)
            best: list[tuple[int, float]] = []
            if top is not None and n:
                best = list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist(), strict=True))
            extras.record(pos, TokenLogprob(token, float(logprobs[j, token]), best))


def install(
    manager: Any, constraints: dict[str, grammar.Constraint], extras: dict[str, RequestExtras]
) -> None:
    """Make a not yet started ContinuousBatchingManager sample with BatchSampler: swap its processor
    list's class, and have the batch processor (built by the manager's thread when it starts) run the
    model runner without sampling of its own, so that its argmax picks greedy rows' best token and
    sampled rows' drawn token. The processors were built from `do_sample=True` already.

    The batch processor must be built in the manager's thread: built in the event loop's thread, the
    engine ran on about 1.5 of 2 cores (and ~30% slower)."""
    manager.logit_processor.__class__ = BatchSampler
    manager.logit_processor.constraints = constraints
    manager.logit_processor.extras = extras
    manager.logit_processor._rows = ()
    manager.logit_processor._extra_rows = ()
    manager.generation_config.do_sample = False
