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
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from shared.capabilities import Capabilities
from shared.events import CHOICE
from shared.logprobs import LOGPROBS
from shared.states import FinishReason, JobStatus
from shared.tool_parsers import parsed_answer
from worker import metrics
from worker.engine import EngineStats
from worker.jobs import EngineUnavailable, JobRunner, _Claim, _Run

log = logging.getLogger(__name__)

# The server went away mid-request, or was not there: a supervised one comes back (the job is handed
# back to the queue meanwhile); another is the job's failure.
LOST = (httpx.TransportError, httpx.StreamClosed)


class HttpEngine:
    """An OpenAI-compatible server the worker forwards to. What the rest of the worker asks of an engine
    (health, stats, capabilities, start/stop), and what the runner asks of a server (a request's body,
    whether and how it continues a text)."""

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


def _stopped(request: Mapping[str, Any], text: str) -> FinishReason:
    """An answer that ended by itself: `tool_calls` when it made calls, as the built-in engine says it."""
    parsed = parsed_answer(dict(request), text)
    return FinishReason.TOOL_CALLS if parsed is not None and parsed.calls else FinishReason.STOP


def _top(request: Mapping[str, Any]) -> int | None:
    """How many alternatives per token a job asked for; None: no logprobs."""
    return int(request.get("top_logprobs") or 0) if request.get("logprobs") else None


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
    logprobs: list[dict[str, Any]]  # of its published tokens
    new: str = ""
    resumed_tokens: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)  # logprobs not yet in an event
    finish: str | None = None
    tokens: int = 0  # chunks with text or logprobs, for a server that sends no usage

    @property
    def text(self) -> str:
        return self.resume + self.new


class HttpRunner(JobRunner):
    """JobRunner with an HTTP server as its engine: the claim, events, deadlines, webhooks, resume and
    final write are JobRunner's; generation is one streamed request per job (one per output when it
    continues outputs of different texts)."""

    def __init__(self, *, upstream: HttpEngine, **kwargs: Any) -> None:
        super().__init__(engine=upstream, **kwargs)  # type: ignore[arg-type]
        self.upstream = upstream
        self._responses: dict[str, list[httpx.Response]] = {}
        self._claims: dict[str, _Claim] = {}

    async def _claim(self, job_id: str) -> _Claim | None:
        claim = await super()._claim(job_id)
        if claim is not None and claim.attempt > 1:
            self._claims[job_id] = claim  # for _published, which decides whether it continues
        return claim

    async def _published(self, job_id: str, n: int) -> tuple[list[str], int, list[list[dict[str, Any]]]]:
        claim = self._claims.pop(job_id, None)
        texts, next_index, logprobs = await super()._published(job_id, n)
        if any(texts) and (claim is None or not self.upstream.continues(claim.request)):
            # Token indexes still go on from the last one: a client's Last-Event-ID stays valid.
            log.info("job %s starts over: %s cannot continue its text", job_id, self.upstream.name)
            return [""] * n, next_index, [[] for _ in range(n)]
        return texts, next_index, logprobs

    def _stop(self, run: _Run) -> None:
        for resp in self._responses.pop(run.job_id, []):
            # Closing the stream is the cancel signal an OpenAI-compatible server understands.
            asyncio.get_running_loop().create_task(resp.aclose())

    async def _generate(self, run: _Run) -> str:
        request = run.claim.request
        max_tokens = int(request.get("max_tokens") or self.default_max_tokens)
        outs = [_Out(i, run.resumes[i], list(run.resume_logprobs[i])) for i in range(run.n)]
        usages: list[dict[str, Any] | None] = []
        self.upstream.stats.active += 1
        try:
            if run.timed_out:
                pass  # its deadline passed already
            elif await self.cancel_flagged(run.job_id):
                run.cancelled = True
            else:
                await self.upstream.ready()
                for out in outs:
                    if out.resume:
                        out.resumed_tokens = await self.upstream.token_count(out.resume)
                if any(out.resume for out in outs) and run.n > 1:
                    # Each output continues its own text: one request each.
                    usages = list(await asyncio.gather(*(self._request(run, [o], max_tokens) for o in outs)))
                else:
                    usages = [await self._request(run, outs, max_tokens)]
        except LOST as exc:
            if not self.upstream.supervised:
                raise
            raise EngineUnavailable(f"{self.upstream.name} server lost ({type(exc).__name__})") from exc
        finally:
            self.upstream.stats.active -= 1
            self._responses.pop(run.job_id, None)
        for out in outs:
            if out.pending:
                self._emit(run, out, "")
        return await self._finish(run, outs, usages)

    async def _request(self, run: _Run, outs: list[_Out], max_tokens: int) -> dict[str, Any] | None:
        """One streamed request for `outs` (all of a job's outputs, or one that continues its text);
        returns the server's usage."""
        request = run.claim.request
        first = outs[0]
        left = max_tokens - first.resumed_tokens
        if left <= 0:
            first.finish = "length"  # max_tokens used up by the text it continues from
            return None
        seed = request.get("seed")
        if seed is not None and len(outs) == 1 and first.index:
            seed = (int(seed) + first.index) % 2**63  # as the built-in engine seeds output i
        path, body = self.upstream.body(request, left, n=len(outs), seed=seed, resume=first.resume)
        top = _top(request)
        chat = request.get("messages") is not None
        usage: dict[str, Any] | None = None
        if run.stopped:
            return None
        try:
            async with self.upstream.client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise RuntimeError(f"upstream answered {resp.status_code}: {resp.text[:500]}")
                self._responses.setdefault(run.job_id, []).append(resp)
                async for chunk in _chunks(resp):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        self._on_choice(run, outs[int(choice.get("index") or 0)], choice, chat, top)
                    if run.stopped:
                        break
        except LOST:
            if not run.stopped:
                raise
        return usage

    def _on_choice(
        self, run: _Run, out: _Out, choice: Mapping[str, Any], chat: bool, top: int | None
    ) -> None:
        """One streamed choice delta: its text and its tokens' logprobs, as a token event."""
        if chat:
            piece = str((choice.get("delta") or {}).get("content") or "")
        else:
            piece = str(choice.get("text") or "")
        entries: list[dict[str, Any]] = []
        if top is not None:
            entries = (_chat_logprobs if chat else _completion_logprobs)(choice, top)
            out.pending += entries
        if piece or entries:
            out.tokens += 1
            self.upstream.stats.tokens += 1
        if piece:
            self._on_text(run)
            out.new += piece
            self._emit(run, out, piece)
            self._output_webhook(run)
        out.finish = choice.get("finish_reason") or out.finish

    def _emit(self, run: _Run, out: _Out, text: str) -> None:
        """A token event, as the built-in engine's: its output's `choice` (n > 1) and the logprobs of
        the tokens its text carries (when asked); its index counts every output's events together."""
        event: dict[str, Any] = {"index": run.next_index, "text": text}
        if run.n > 1:
            event[CHOICE] = out.index
        if _top(run.claim.request) is not None:
            event[LOGPROBS] = out.pending
        self.events.emit(run.job_id, "token", event, attempt=run.claim.attempt)
        run.next_index += 1
        out.logprobs += out.pending
        out.pending = []

    async def _finish(self, run: _Run, outs: list[_Out], usages: list[dict[str, Any] | None]) -> str:
        got = [u for u in usages if u]
        new = sum(int(u.get("completion_tokens") or 0) for u in got) if got else sum(o.tokens for o in outs)
        completion = new + sum(o.resumed_tokens for o in outs)
        prompt = run.claim.prompt_tokens
        if not prompt and got:
            # The server counts a continued text as prompt.
            prompt = int(got[0].get("prompt_tokens") or 0) - (outs[0].resumed_tokens if outs[0].resume else 0)
        self.upstream.stats.tokens += new - sum(o.tokens for o in outs)  # the server's count wins
        metrics.generation_tokens.labels(self.model_name).inc(new)  # the server tells at the end
        reasons = [self._reason(run, o) for o in outs]
        asked = _top(run.claim.request) is not None
        choices = None
        if run.n > 1:
            choices = [
                {
                    "index": o.index,
                    "text": o.text,
                    "finish_reason": reason.value,
                    **({"logprobs": o.logprobs} if asked else {}),
                }
                for o, reason in zip(outs, reasons, strict=True)
            ]
        status = JobStatus.CANCELLED if run.stopped else JobStatus.SUCCEEDED
        first = outs[0]
        return await self._complete(
            run,
            status,
            first.text,
            completion,
            reasons[0],
            prompt or 0,
            first.logprobs if asked else None,
            choices,
        )

    @staticmethod
    def _reason(run: _Run, out: _Out) -> FinishReason:
        if run.cancelled:
            return FinishReason.CANCELLED
        if run.timed_out:
            return FinishReason.TIMEOUT
        if out.finish == "length":
            return FinishReason.LENGTH
        return _stopped(run.claim.request, out.text)

    def _on_text(self, run: _Run) -> None:
        if run.t_first is None:
            run.t_first = time.monotonic()
            queued = (run.claim.started_at - run.claim.created_at).total_seconds()
            metrics.ttft.labels(self.model_name).observe(queued + run.t_first - run.t_start)
