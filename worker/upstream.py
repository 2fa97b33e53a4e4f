"""The `openai-http` engine: a worker that forwards each job to an OpenAI-compatible inference server
(vLLM, TGI, SGLang, `transformers serve`) and streams its answer back, so that such a server gets
inferq's queue, persistence, batches, SSE resume and tenants in front of it.

The upstream server does the batching; this worker only holds up to `max_batch` streams open at once.
Cancelling a job closes its upstream stream, which is how those servers learn to stop generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from shared.capabilities import Capabilities, openai_http_engine
from shared.states import FinishReason, JobStatus
from worker import metrics
from worker.engine import EngineStats
from worker.jobs import JobRunner, _Run

log = logging.getLogger(__name__)


class UpstreamEngine:
    """What the rest of the worker asks of an engine (health, stats, start/stop), for an upstream server."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )
        self.stats = EngineStats()
        self.healthy = True

    def start(self) -> None:
        pass

    def capabilities(self) -> Capabilities:
        return openai_http_engine()

    async def warmup(self) -> None:
        """Fail start-up if the server cannot be reached; any HTTP answer means it is there."""
        resp = await self.client.get("/models")
        if resp.status_code != 200:
            log.warning("upstream GET /models answered %d; going on", resp.status_code)

    def stop(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.client.aclose()


def _body(request: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request["max_tokens"],
    }
    for name in ("temperature", "top_p", "stop", "seed"):
        if request.get(name) is not None:
            body[name] = request[name]
    if request.get("messages") is not None:
        return "/chat/completions", {**body, "messages": request["messages"]}
    return "/completions", {**body, "prompt": request["prompt"]}


async def _chunks(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"upstream error: {chunk['error']}")
        yield chunk


def _text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    return str((delta or {}).get("content") or "") if delta is not None else str(choice.get("text") or "")


class UpstreamRunner(JobRunner):
    def __init__(self, *, upstream: UpstreamEngine, upstream_model: str, **kwargs: Any) -> None:
        super().__init__(engine=upstream, **kwargs)  # type: ignore[arg-type]
        self.upstream = upstream
        self.upstream_model = upstream_model
        self._responses: dict[str, httpx.Response] = {}

    def _stop(self, run: _Run) -> None:
        resp = self._responses.pop(run.job_id, None)
        if resp is not None:
            # Closing the stream is the cancel signal an OpenAI-compatible server understands.
            asyncio.get_running_loop().create_task(resp.aclose())

    async def _generate(self, run: _Run) -> str:
        request = run.claim.request
        path, body = _body(request, self.upstream_model)
        if await self.cancel_flagged(run.job_id):
            run.cancelled = True
        text, index, usage, finish = "", 0, None, None
        if not run.stopped:
            try:
                async with self.upstream.client.stream("POST", path, json=body) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise RuntimeError(f"upstream answered {resp.status_code}: {resp.text[:500]}")
                    self._responses[run.job_id] = resp
                    async for chunk in _chunks(resp):
                        usage = chunk.get("usage") or usage
                        choices = chunk.get("choices") or []
                        finish = (choices[0].get("finish_reason") if choices else None) or finish
                        piece = _text(chunk)
                        if piece:
                            self._on_text(run)
                            text += piece
                            self.events.emit(run.job_id, "token", {"index": index, "text": piece})
                            index += 1
                            self._output_webhook(run)
                        if run.stopped:
                            break
            except (httpx.StreamClosed, httpx.ReadError, httpx.RemoteProtocolError):
                if not run.stopped:
                    raise
            finally:
                self._responses.pop(run.job_id, None)
        completion = int((usage or {}).get("completion_tokens") or index)
        prompt = int((usage or {}).get("prompt_tokens") or run.claim.prompt_tokens or 0)
        self.upstream.stats.tokens += completion
        metrics.generation_tokens.labels(self.model_name).inc(completion)  # the upstream tells at the end
        if run.cancelled:
            reason = FinishReason.CANCELLED
        elif run.timed_out:
            reason = FinishReason.TIMEOUT
        else:
            reason = FinishReason.LENGTH if finish == "length" else FinishReason.STOP
        status = JobStatus.CANCELLED if run.stopped else JobStatus.SUCCEEDED
        return await self._complete(run, status, text, completion, reason, prompt)

    def _on_text(self, run: _Run) -> None:
        if run.t_first is None:
            run.t_first = time.monotonic()
            queued = (run.claim.started_at - run.claim.created_at).total_seconds()
            metrics.ttft.labels(self.model_name).observe(queued + run.t_first - run.t_start)
