"""Grammar matchers for structured outputs and tool calls: one llguidance matcher per constrained request.

The tokenizer view llguidance needs (~1 s to build) is made once per worker, when the engine starts;
each schema's matcher is built once (keyed by the canonical schema JSON) and copied for each request,
so a batch of 50,000 lines with one schema builds one grammar.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from shared import structured

_CACHED_SCHEMAS = 256


class Constraint:
    """One request's matcher, advanced with the tokens the request generated (read from its state in
    the engine's thread before each step, so it always matches what the engine appended)."""

    __slots__ = ("consumed", "matcher")

    def __init__(self, matcher: LLMatcher, prefix: Sequence[int] = ()) -> None:
        self.matcher = matcher
        self.consumed = 0
        if prefix:  # a retried job continues the text an earlier attempt published
            matcher.consume_tokens(list(prefix))

    def catch_up(self, new: Sequence[int], total: int) -> None:
        """`total`: how many tokens the request generated; `new`: the last `total - consumed` of them, the
        ones the matcher has not seen (sampling.generated_tail finds them wherever the engine keeps them)."""
        if total > self.consumed:
            if len(new) != total - self.consumed:
                # A token skipped here would put the grammar one token behind the text: the call it then
                # guides is not the call the text holds (the 'stop' with no parseable call of issue 25).
                raise ValueError(f"{total - self.consumed} new tokens expected, {len(new)} given")
            self.matcher.consume_tokens(list(new))
            self.consumed = total


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._tokenizer: LLTokenizer = from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_id)
        self._matchers: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def constraint(
        self, response_format: dict[str, Any] | None, prefix: Sequence[int] = ()
    ) -> Constraint | None:
        """A fresh matcher for a request's response format (None for plain text); raises SchemaError."""
        schema = structured.schema_of(response_format)
        if schema is None:
            return None
        key = structured.canonical(schema)
        return self._matcher(key, lambda: structured.grammar(key), prefix)

    def tool_constraint(self, grammar: str, prefix: Sequence[int] = ()) -> Constraint:
        """A fresh matcher for a request's tool grammar (shared/tools.py), cached by its text."""
        return self._matcher(grammar, lambda: grammar, prefix)

    def _matcher(self, key: str, build: Callable[[], str], prefix: Sequence[int]) -> Constraint:
        with self._lock:
            template = self._matchers.get(key)
            if template is not None:
                self._matchers.move_to_end(key)
        if template is None:
            template = LLMatcher(self._tokenizer, build(), log_level=0)
            if template.is_error():
                raise structured.SchemaError(structured.SCHEMA_UNSUPPORTED.format(error=template.get_error()))
            with self._lock:
                self._matchers[key] = template
                while len(self._matchers) > _CACHED_SCHEMAS:
                    self._matchers.popitem(last=False)
        return Constraint(template.deep_copy(), prefix)

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)


# The 32 bit positions of a word, per device: made once, not copied to the device at every step.
_BITS: dict[torch.device, torch.Tensor] = {}


def forbidden(bitmask: torch.Tensor, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean [rows, vocab] mask, on `device`, of the tokens llguidance's packed int32 bitmask (in
    host memory) forbids (bit i of word w: token 32w+i). On a CPU it is unpacked with numpy: about 3x
    faster here than shifts in torch. On another device the packed words are copied there (32 times
    smaller than the mask) and unpacked with torch shifts (`forbidden_torch`). llguidance.torch's helper
    does the same but is torch.compile'd, which needs a C compiler on a CPU host and a compile per shape."""
    if torch.device(device).type != "cpu":
        return forbidden_torch(bitmask.to(device, non_blocking=True), vocab_size)
    packed = np.invert(bitmask.numpy()).view(np.uint8)  # little-endian words: bytes in token order
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).to(torch.bool)


def forbidden_torch(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`forbidden` with torch ops only, on the bitmask's own device."""
    shifts = _BITS.get(bitmask.device)
    if shifts is None:
        shifts = _BITS.setdefault(bitmask.device, torch.arange(32, dtype=torch.int32, device=bitmask.device))
    allowed = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]; >> keeps the sign, & 1 drops it
    return (allowed == 0).view(bitmask.size(0), -1)[:, :vocab_size]


def fill(constraint: Constraint, bitmask: torch.Tensor, row: int) -> None:
    v = bitmask[row]
    constraint.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
