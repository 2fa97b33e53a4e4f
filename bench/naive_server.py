"""The naive design, as a peer for the throughput benchmark: one `model.generate` per request, run in a
thread pool, its tokens streamed back through transformers' async text streamer. No batching, no queue.

    python -m bench.naive_server --model DIR --port 8000 [--generate-threads 4]

Serves `POST /v1/chat/completions` (stream true or false; greedy when temperature is 0) and `GET /health`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AsyncTextIteratorStreamer, AutoModelForCausalLM, AutoTokenizer


def create_app(model_dir: str, generate_threads: int) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pool = ThreadPoolExecutor(max_workers=generate_threads, thread_name_prefix="generate")
    app = FastAPI()

    def _chunk(rid: str, delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_dir,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def _generate(inputs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        inputs = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(body.get("max_tokens") or 256),
            "do_sample": temperature > 0,
            "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
        prompt_len = int(inputs["input_ids"].shape[1])
        loop = asyncio.get_running_loop()
        rid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if not body.get("stream"):
            out = await loop.run_in_executor(pool, _generate, inputs, kwargs)
            text = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
            n = int(out.shape[1]) - prompt_len
            usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
            message = {"role": "assistant", "content": text}
            return JSONResponse({"id": rid, "choices": [{"index": 0, "message": message}], "usage": usage})

        streamer = AsyncTextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs["streamer"] = streamer
        future = loop.run_in_executor(pool, _generate, inputs, kwargs)

        async def events() -> AsyncIterator[str]:
            yield _chunk(rid, {"role": "assistant"})
            async for text in streamer:
                if text:
                    yield _chunk(rid, {"content": text})
            out = await future
            n = int(out.shape[1]) - prompt_len
            finish = "length" if n >= kwargs["max_new_tokens"] else "stop"
            yield _chunk(rid, {}, finish)
            yield _chunk(
                rid,
                {},
                usage={"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n},
            )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--generate-threads", type=int, default=4, help="Concurrent generate() calls.")
    args = parser.parse_args()
    app = create_app(args.model, args.generate_threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
