"""Token logprobs as the worker publishes them (OpenAI's chat shape) and the legacy completions shape.

The worker puts a list of `TokenLogprob` dicts under `LOGPROBS` in the token events of a job that asked
for them (the logprobs of the tokens whose text that event carries, or held back before it), and the
whole list in the job's row when it ends; the API renders them for each route.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# The key of a token event's logprobs, and of the job's own (GET /v1/jobs/{id}).
LOGPROBS = "logprobs"
# The most alternatives per token: OpenAI's limits for chat (top_logprobs) and completions (logprobs).
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

TOP_LOGPROBS_WITHOUT_LOGPROBS = "top_logprobs needs logprobs: true"


class TopLogprob(BaseModel):
    token: str = Field(description="The token's text (U+FFFD where its bytes are part of a character).")
    logprob: float
    bytes: list[int] | None = Field(description="The token's UTF-8 bytes.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely tokens at this position, best first.")


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape of chat-shaped entries: `text_offset` counts characters of the
    completion's text from `offset`."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        token_logprobs.append(entry["logprob"])
        top.append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
        text_offset.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    }
