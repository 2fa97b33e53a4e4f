"""Incremental detokenization and stop strings, with the demo model's real tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from worker.detok import IncrementalDecoder


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def _stream(tokenizer: Any, text: str, stop: list[str] | None = None) -> tuple[list[str], IncrementalDecoder]:
    decoder = IncrementalDecoder(tokenizer, stop)
    pieces = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(decoder.push([token_id]))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    return pieces, decoder


def test_decoder_streams_the_exact_text_including_multibyte_characters(tokenizer: Any) -> None:
    text = "Héllo, wörld! 😀 Ünïcode → 漢字 and more."
    pieces, decoder = _stream(tokenizer, text)
    assert "".join(pieces) == text == decoder.text
    assert all("\ufffd" not in p for p in pieces)


def test_decoder_skips_special_tokens(tokenizer: Any) -> None:
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer.encode("Paris.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert decoder.push(ids) + decoder.finish() == "Paris."


def test_stop_string_across_token_boundaries_cuts_the_text(tokenizer: Any) -> None:
    pieces, decoder = _stream(tokenizer, "The capital of France is Paris. It is big.", stop=["of Fr"])
    assert decoder.stopped
    assert "".join(pieces) == decoder.text == "The capital "


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer: Any) -> None:
    decoder = IncrementalDecoder(tokenizer, ["Paris!"])
    released = ""
    for token_id in tokenizer.encode("The capital is Paris. Yes.", add_special_tokens=False):
        released += decoder.push([token_id])
        assert "Paris!" not in released
    assert not decoder.stopped
    assert released + decoder.finish() == "The capital is Paris. Yes."


def test_first_of_several_stop_strings_wins(tokenizer: Any) -> None:
    pieces, decoder = _stream(tokenizer, "one two three four", stop=["four", "two"])
    assert decoder.text == "one "


@pytest.mark.parametrize("cut", [1, 5, 9, 14])
def test_decoder_with_context_continues_text_exactly_where_it_stopped(tokenizer: Any, cut: int) -> None:
    """A retried job continues after the text it had: decoding the rest with that text's tokens as
    context gives exactly the rest, spaces and multi-byte characters included."""
    text = "The dragon, Ünïcode → 漢字, cooked a fine soup for all his friends."
    ids = tokenizer.encode(text, add_special_tokens=False)
    head = tokenizer.decode(ids[:cut])
    decoder = IncrementalDecoder(tokenizer, context=ids[:cut])
    rest = "".join(decoder.push([i]) for i in ids[cut:]) + decoder.finish()
    assert head + rest == text
    assert decoder.token_ids == ids[cut:] and decoder.text == rest
