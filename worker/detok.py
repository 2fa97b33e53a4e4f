"""Incremental detokenization with stop strings: text is released only once no stop string can start in it."""

from __future__ import annotations

from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

# Tokens of context decoded with each new one: enough for a tokenizer to place spaces and join bytes.
_CONTEXT_TOKENS = 6


class IncrementalDecoder:
    """`context`: token ids that come before the generated ones (e.g. the text a retried job continues
    from); they shape how the first new tokens decode but are not part of `text` or `token_ids`."""

    def __init__(
        self, tokenizer: Any, stop: list[str] | None = None, context: list[int] | None = None
    ) -> None:
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._ids: list[int] = list(context or [])
        self._context = len(self._ids)
        self._prefix_offset = max(0, self._context - _CONTEXT_TOKENS)
        self._read_offset = self._context
        self._buffer = ""  # all text decoded so far (released + held back)
        self._released = 0
        self.stopped = False

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids."""
        return self._ids[self._context :]

    @property
    def text(self) -> str:
        """Text released so far."""
        return self._buffer[: self._released]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def push(self, ids: list[int]) -> str:
        """Add generated token ids; return the newly released text."""
        if self.stopped:
            return ""
        for token_id in ids:
            self._ids.append(token_id)
            self._buffer += self._delta()
            if self._stop and self._check_stop():
                break
        return self._release(final=False)

    def finish(self) -> str:
        """Release whatever is still held back (the generation is over)."""
        if not self.stopped:
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            self._buffer += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
            if self._stop:
                self._check_stop()
        return self._release(final=True)

    def _delta(self) -> str:
        # Decoding a window, not the whole sequence, keeps this O(1) per token; a trailing U+FFFD means
        # a multi-byte character is not complete yet, so wait for the next token.
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def _check_stop(self) -> bool:
        longest = max(len(s) for s in self._stop)
        start = max(0, self._released - longest)
        hits = [i for i in (self._buffer.find(s, start) for s in self._stop) if i >= 0]
        if not hits:
            return False
        self._buffer = self._buffer[: min(hits)]
        self.stopped = True
        return True

    def _held_back(self) -> int:
        """Length of the buffer's longest suffix that could still grow into a stop string."""
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._buffer)), held, -1):
                if self._buffer.endswith(s[:n]):
                    held = n
                    break
        return held

    def _release(self, final: bool) -> str:
        end = len(self._buffer) if (final or self.stopped) else len(self._buffer) - self._held_back()
        if end <= self._released:
            return ""
        out = self._buffer[self._released : end]
        self._released = end
        return out


class TokenTexts:
    """Each token's text and exact bytes, for logprobs (cached: the same few thousand tokens come back).

    A byte-level BPE vocabulary (GPT-2's, SmolLM2's) spells each byte as a printable character; mapping
    them back gives the token's bytes, of which a token may hold part of a character. Other tokenizers
    give the bytes of the token's decoded text."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._unbyte: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self._added: dict[int, str] = {int(i): str(t.content) for i, t in added.items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.encode()
        if self._byte_level:
            piece = self._tok.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in self._unbyte for c in piece):
                return bytes([self._unbyte[c] for c in piece])
        return str(self._tok.decode([token_id])).encode()
