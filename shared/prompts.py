"""Turning a request into prompt token ids, the same way in the API (to count) and the worker (to run)."""

from __future__ import annotations

from typing import Any, Protocol

from shared import tools


class Tokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...


def prompt_token_ids(tokenizer: Tokenizer, request: dict[str, Any]) -> list[int]:
    """Token ids of a validated request dict (`messages` through the chat template, or a raw `prompt`)."""
    messages = request.get("messages")
    if messages is not None:
        if not tokenizer.chat_template:
            raise ValueError("this model has no chat template: send 'prompt' instead of 'messages'")
        # Tools, earlier calls and their results as this model is shown them (shared/tools.py).
        messages, shown = tools.chat_messages(request, tokenizer.chat_template)
        extra = {} if shown is None else {"tools": shown}
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return list(tokenizer.encode(str(request["prompt"]), add_special_tokens=True))
