"""What the HTTP engines share: a worker that forwards each job to an OpenAI-compatible server and maps
its streamed answer into inferq's events and records exactly as the built-in engine does (each of n
outputs by its `choice`, logprobs in shared.logprobs' shape, usage from the server), so that such a
server gets inferq's queue, persistence, batches, SSE resume and tenants in front of it.

The server does the batching; the worker only holds up to `max_batch` streams open at once. Cancelling a
job closes its streams, which is how those servers learn to stop generating.

A job re-run after its worker died continues from the text it had published where the engine can make
the server continue it (`HttpEngine.continuation`); otherwise it starts over, and its `running` status
says so (`resume_from_chars: 0`), so a client following the stream drops the old text instead of seeing
it twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from shared.capabilities import Capabilities
from shared.states import FinishReason
from shared.tool_parsers import parsed_answer
from worker.engines.base import EngineStats, EngineUnavailable, GenerationJob, Outcome, TokenSink
from worker.outputs import top_logprobs as _top

log = logging.getLogger(__name__)

# The server went away mid-request, or was not there: a supervised one comes back (the job is handed
# back to the queue meanwhile); another is the job's failure.
LOST = (httpx.TransportError, httpx.StreamClosed)


class HttpEngine:
    """An OpenAI-compatible server the worker forwards to, behind the engine contract (engines.base):
    its life, what it honours, and each job's generation (HttpGeneration); what a server of one kind
    needs (a request's body, whether and how it continues a text) is for its subclass to say."""

    name = "openai-http"
    # Whether this worker runs the server itself (it comes back when it dies: a lost stream is a job
    # handed back to the queue, not a failed job).
    supervised = False

    def __init__(self, base_url: str, api_key: str | None, timeout: float, model: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No cap on connections: the worker holds at most max_batch streams, and every one must flow.
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
        )
        self.stats = EngineStats()

    @property
    def healthy(self) -> bool:
        """False once the engine cannot serve any more (the worker then stops, for a fresh start)."""
        return True

    @property
    def root(self) -> str:
        """The server's root (vLLM's /health, /tokenize and /metrics are there, not under /v1)."""
        return self.base_url.removesuffix("/v1")

    @property
    def health_url(self) -> str:
        """What answers 200 once the server can take requests (every OpenAI-compatible one has /models)."""
        return f"{self.base_url}/models"

    def start(self) -> None:
        pass

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    async def warmup(self) -> None:
        """Fail start-up if the server cannot be reached; any HTTP answer means it is there."""
        resp = await self.client.get("/models")
        if resp.status_code != 200:
            log.warning("upstream GET /models answered %d; going on", resp.status_code)

    async def ready(self) -> None:
        """Return once the server can take a request (a supervised one may be restarting)."""

    def stop(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.client.aclose()

    def continues(self, request: Mapping[str, Any]) -> bool:
        """Whether a re-run of `request` can continue the text an earlier attempt published."""
        return False

    async def token_count(self, text: str) -> int:
        """How many tokens `text` is (what a continued output has generated already)."""
        raise NotImplementedError

    def body(
        self, request: Mapping[str, Any], max_tokens: int, *, n: int, seed: int | None, resume: str
    ) -> tuple[str, dict[str, Any]]:
        """The path and body of one streamed request for `request`: `n` outputs, continuing `resume`."""
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
        }
        # Only what the capabilities let through reaches here (the API refuses the rest at submit).
        for name in ("temperature", "top_p", "top_k", "stop", "response_format"):
            if request.get(name) is not None:
                body[name] = request[name]
        if seed is not None:
            body["seed"] = seed
        if n > 1:
            body["n"] = n
        top = _top(request)
        if request.get("messages") is not None:
            if top is not None:
                body.update(logprobs=True, top_logprobs=top)
            messages = list(request["messages"])
            if resume:
                messages.append({"role": "assistant", "content": resume})
                body.update(self.continuation())
            return "/chat/completions", {**body, "messages": messages}
        if top is not None:
            body["logprobs"] = top  # the legacy shape: how many alternatives
        return "/completions", {**body, "prompt": str(request["prompt"]) + resume}

    def continuation(self) -> dict[str, Any]:
        """The fields that make a chat request continue its last (assistant) message."""
        raise NotImplementedError

    def generation(self, job: GenerationJob) -> HttpGeneration:
        return HttpGeneration(self, job)


def _stopped(request: Mapping[str, Any], text: str) -> FinishReason:
    """An answer that ended by itself: `tool_calls` when it made calls, as the built-in engine says it."""
    parsed = parsed_answer(dict(request), text)
    return FinishReason.TOOL_CALLS if parsed is not None and parsed.calls else FinishReason.STOP


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


def _chat_logprobs(choice: Mapping[str, Any], top: int) -> list[dict[str, Any]]:
    """A chat chunk's logprobs: already OpenAI's shape, which is inferq's (shared.logprobs)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    return [
        {
            "token": e["token"],
            "logprob": float(e["logprob"]),
            "bytes": e.get("bytes"),
            "top_logprobs": [
                {"token": t["token"], "logprob": float(t["logprob"]), "bytes": t.get("bytes")}
                for t in (e.get("top_logprobs") or [])[:top]
            ],
        }
        for e in content
    ]


def _completion_logprobs(choice: Mapping[str, Any], top: int) -> list[dict[str, Any]]:
    """A completions chunk's legacy logprobs (parallel lists, alternatives as a dict) in inferq's shape."""
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    alts = lp.get("top_logprobs") or [None] * len(tokens)
    out = []
    for token, value, alt in zip(tokens, values, alts, strict=False):
        best = sorted((alt or {}).items(), key=lambda kv: -float(kv[1]))[:top]
        out.append(
            {
                "token": token,
                "logprob": float(value),
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": float(v), "bytes": list(t.encode())} for t, v in best
                ],
            }
        )
    return out


@dataclass
class _Out:
    """One of a job's n outputs as the server streams it."""

    index: int
    resume: str  # the text earlier attempts published, which this one continues
    resumed_tokens: int = 0
    finish: str | None = None
    tokens: int = 0  # chunks with text or logprobs, for a server that sends no usage
    pieces: list[str] = field(default_factory=list)  # the text it streamed

    @property
    def text(self) -> str:
        return self.resume + "".join(self.pieces)


class HttpGeneration:
    """One job's generation on the server: one streamed request for all its outputs (one per output when
    it continues outputs of different texts)."""

    def __init__(self, engine: HttpEngine, job: GenerationJob) -> None:
        self.engine = engine
        self.job = job
        self.cancelled = False
        self.outs = [_Out(i, job.resumes[i]) for i in range(job.n)]
        self.usages: list[dict[str, Any] | None] = []
        self.top = _top(job.request)
        self.chat = job.request.get("messages") is not None
        self._responses: list[httpx.Response] = []

    async def run(self, sink: TokenSink) -> None:
        engine, outs = self.engine, self.outs
        engine.stats.active += 1
        try:
            await engine.ready()
            for out in outs:
                if out.resume:
                    out.resumed_tokens = await engine.token_count(out.resume)
            if any(out.resume for out in outs) and len(outs) > 1:
                # Each output continues its own text: one request each.
                self.usages = list(await asyncio.gather(*(self._request(sink, [o]) for o in outs)))
            else:
                self.usages = [await self._request(sink, outs)]
        except LOST as exc:
            if not engine.supervised:
                raise
            raise EngineUnavailable(f"{engine.name} server lost ({type(exc).__name__})") from exc
        finally:
            engine.stats.active -= 1
            self._responses.clear()
        got = [u for u in self.usages if u]
        if got:  # the server's count wins
            engine.stats.tokens += self._generated(got) - sum(o.tokens for o in outs)
        for out in outs:
            sink.end(out.index)

    def cancel(self) -> None:
        self.cancelled = True
        responses, self._responses = self._responses, []
        for resp in responses:
            # Closing the stream is the cancel signal an OpenAI-compatible server understands.
            asyncio.get_running_loop().create_task(resp.aclose())

    async def _request(self, sink: TokenSink, outs: list[_Out]) -> dict[str, Any] | None:
        """One streamed request for `outs` (all of a job's outputs, or one that continues its text);
        returns the server's usage."""
        request = self.job.request
        first = outs[0]
        left = self.job.max_tokens - first.resumed_tokens
        if left <= 0:
            first.finish = "length"  # max_tokens used up by the text it continues from
            return None
        seed = request.get("seed")
        if seed is not None and len(outs) == 1 and first.index:
            seed = (int(seed) + first.index) % 2**63  # as the built-in engine seeds output i
        path, body = self.engine.body(request, left, n=len(outs), seed=seed, resume=first.resume)
        usage: dict[str, Any] | None = None
        if self.cancelled:
            return None
        try:
            async with self.engine.client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise RuntimeError(f"upstream answered {resp.status_code}: {resp.text[:500]}")
                self._responses.append(resp)
                async for chunk in _chunks(resp):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        self._on_choice(sink, outs[int(choice.get("index") or 0)], choice)
                    if self.cancelled:
                        break
        except LOST:
            if not self.cancelled:
                raise
        return usage

    def _on_choice(self, sink: TokenSink, out: _Out, choice: Mapping[str, Any]) -> None:
        """One streamed choice delta: its text and its tokens' logprobs."""
        if self.chat:
            piece = str((choice.get("delta") or {}).get("content") or "")
        else:
            piece = str(choice.get("text") or "")
        entries: list[dict[str, Any]] | None = None
        if self.top is not None:
            entries = (_chat_logprobs if self.chat else _completion_logprobs)(choice, self.top)
        count = 1 if piece or entries else 0
        if entries and not piece and choice.get("finish_reason") == "stop":
            # The end-of-sequence token (vLLM lists it, as "<|im_end|>"): counted, but not listed, as
            # the built-in engine does, so that the tokens listed join into the output.
            entries = []
        out.tokens += count
        self.engine.stats.tokens += count
        if piece:
            out.pieces.append(piece)
        sink.tokens(out.index, piece, entries, count)
        out.finish = choice.get("finish_reason") or out.finish

    def _generated(self, got: list[dict[str, Any]]) -> int:
        if got:
            return sum(int(u.get("completion_tokens") or 0) for u in got)
        return sum(o.tokens for o in self.outs)

    def outcome(self) -> Outcome:
        outs = self.outs
        got = [u for u in self.usages if u]
        new = self._generated(got)
        prompt = self.job.prompt_tokens
        if not prompt and got:
            # The server counts a continued text as prompt.
            prompt = int(got[0].get("prompt_tokens") or 0) - (outs[0].resumed_tokens if outs[0].resume else 0)
        return Outcome(
            reasons=[
                FinishReason.LENGTH if o.finish == "length" else _stopped(self.job.request, o.text)
                for o in outs
            ],
            prompt_tokens=prompt or 0,
            completion_tokens=new + sum(o.resumed_tokens for o in outs),
            generated=new,
        )
