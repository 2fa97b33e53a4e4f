"""The one client every throughput figure uses: a streaming OpenAI-compatible chat completion, sent
over bench.rawhttp (one keep-alive connection per virtual user; cheap on CPU, no shared-pool cost).

TTFT is the time from sending the request to the first chunk with non-empty `delta.content`.
Completion tokens come from the `usage` a server sends (inferq with `stream_options.include_usage`,
`transformers serve` and the naive server on their last chunk), else from the number of content chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from bench.rawhttp import Connection


@dataclass
class StreamResult:
    ttft_s: float
    total_s: float
    tokens: int
    chunks: int
    text: str
    started: float  # perf_counter at send
    usage_reported: bool


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(conn: Connection, body: dict[str, Any]) -> StreamResult:
    """POST /v1/chat/completions with stream=true and read it to `[DONE]` (or the end of the body)."""
    t0 = time.perf_counter()
    first = 0.0
    chunks = 0
    usage: dict[str, Any] | None = None
    parts: list[str] = []
    errors: list[bytes] = []
    async for status, line in conn.stream_lines("POST", "/v1/chat/completions", json_body=body):
        if status != 200:
            errors.append(line)
            continue
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue  # read on to the end of the body, so the connection can be reused
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if not first:
                    first = time.perf_counter() - t0
                chunks += 1
                parts.append(content)
    if errors:
        raise RuntimeError(f"HTTP error: {b' '.join(errors)[:300]!r}")
    total = time.perf_counter() - t0
    tokens = int(usage["completion_tokens"]) if usage else chunks
    return StreamResult(first or total, total, tokens, chunks, "".join(parts), t0, usage is not None)
