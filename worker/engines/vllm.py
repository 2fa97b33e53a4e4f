"""The `vllm` engine: jobs forwarded to vLLM's OpenAI server, every field vLLM honours passed through
(n, logprobs and top_logprobs, response_format, seed, top_k, stop) and mapped back as the built-in engine
maps its own. The server is the worker's own (worker/engines/vllm_server.py) unless --upstream-url names
one that runs already.

A job re-run after its worker died continues the text it had published: vLLM continues the assistant
message (`continue_final_message`, no new generation prompt) on chat, and the prompt plus the text on
completions, with max_tokens less the tokens that text already is. Structured output starts over (vLLM
would apply the schema to the continuation alone, from its first character), and so does an answer that
may hold tool calls.

Tools: vLLM generates the text the built-in engine would, so that everything after the worker (the
stored output, the token events, and the API's one parser of calls for every view) is the same. The
worker sends the model the tools as the built-in engine shows them (`shared.tools.chat_messages`: as
`tools` to a chat template that renders Hermes calls itself, else as a system block, with earlier calls
and results as Hermes text) and inferq's own tool grammar as a structured-outputs grammar (Lark, which
vLLM gives to llguidance, the built-in engine's grammar library). So `required`, a named function,
`auto` and `parallel_tool_calls` have the same guarantees on both engines, and vLLM's own tool parsing
(`--enable-auto-tool-choice`), which would leave `auto` unconstrained, is not used: the request carries
`tool_choice: "none"` when it carries `tools` at all, for the template only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx

from shared import tools
from shared.capabilities import Capabilities, vllm_engine
from worker.engines.http import HttpEngine
from worker.engines.vllm_server import VllmServer

log = logging.getLogger(__name__)

# A function no real request names: the probe of whether the model's chat template renders tools.
PROBE_FUNCTION = "inferq_template_probe"


class VllmEngine(HttpEngine):
    name = "vllm"

    def __init__(
        self, base_url: str, api_key: str | None, timeout: float, model: str, server: VllmServer | None = None
    ) -> None:
        super().__init__(base_url, api_key, timeout, model)
        self.server = server
        self.supervised = server is not None
        # Whether the served chat template renders tools and Hermes calls itself (probed at warmup).
        self.template_renders_tools = False

    def capabilities(self) -> Capabilities:
        return vllm_engine()

    @property
    def health_url(self) -> str:
        return f"{self.root}/health"

    async def warmup(self) -> None:
        if self.server is not None:
            await self.server.start()
        await super().warmup()
        self.template_renders_tools = await self._probe_template()
        log.info(
            "vllm: the chat template %s tools",
            "renders" if self.template_renders_tools else "does not render",
        )

    async def _probe_template(self) -> bool:
        """Whether the served chat template shows tools and renders a call in Hermes' format (what
        shared.tools.template_renders_tools reads off the template's text on the built-in engine):
        vLLM renders a conversation with one tool and one call, and the prompt is read back."""
        function = {"name": PROBE_FUNCTION, "parameters": dict(tools.EMPTY_PARAMETERS)}
        call = {
            "id": "call_probe",
            "type": "function",
            "function": {"name": PROBE_FUNCTION, "arguments": "{}"},
        }
        messages = [
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        body = {
            "model": self.model,
            "messages": messages,
            "tools": [{"type": "function", "function": function}],
            "add_generation_prompt": False,
        }
        try:
            resp = await self.client.post(f"{self.root}/tokenize", json=body)
            if resp.status_code != 200:  # e.g. a template that cannot render a message with no text
                return False
            tokens = {"model": self.model, "tokens": resp.json()["tokens"]}
            resp = await self.client.post(f"{self.root}/detokenize", json=tokens)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning(
                "vllm: could not read how the chat template renders tools (%s); tools go in a system block",
                exc,
            )
            return False
        prompt = str(resp.json()["prompt"])
        # Its name twice: once among the tools shown, once in the call.
        return tools.CALL_START in prompt and prompt.count(PROBE_FUNCTION) >= 2

    @property
    def healthy(self) -> bool:
        return self.server is None or not self.server.gave_up

    async def ready(self) -> None:
        if self.server is not None:
            await self.server.wait_serving()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def continues(self, request: Mapping[str, Any]) -> bool:
        if tools.calls_allowed(request):
            return False  # the grammar would start at the continuation; the built-in one replays the text
        fmt = request.get("response_format")
        return not (isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema"))

    def body(
        self, request: Mapping[str, Any], max_tokens: int, *, n: int, seed: int | None, resume: str
    ) -> tuple[str, dict[str, Any]]:
        if not _mentions_tools(request):
            return super().body(request, max_tokens, n=n, seed=seed, resume=resume)
        messages, shown = self.tool_messages(request)
        path, body = super().body(
            {**request, "messages": messages}, max_tokens, n=n, seed=seed, resume=resume
        )
        if shown:
            # For the template only: vLLM parses nothing with "none" (its own default needs its tool parser).
            body.update(tools=shown, tool_choice="none")
        grammar = tools.request_grammar(request)
        if grammar is not None:
            body["structured_outputs"] = {"grammar": grammar}
        return path, body

    def tool_messages(
        self, request: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and the `tools` (None: not sent) of a request with tools or calls in its history,
        as the built-in engine gives them to the chat template. A template that renders them gets the
        messages as they came (vLLM itself turns a call's arguments into the object templates expect)."""
        if not self.template_renders_tools:
            messages, _ = tools.chat_messages(request, None)
            return messages, None
        shown = [dict(t) for t in request.get("tools") or []] if tools.calls_allowed(request) else None
        return [dict(m) for m in request.get("messages") or []], shown

    def continuation(self) -> dict[str, Any]:
        return {"continue_final_message": True, "add_generation_prompt": False}

    async def token_count(self, text: str) -> int:
        resp = await self.client.post(
            f"{self.root}/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False}
        )
        resp.raise_for_status()
        return int(resp.json()["count"])


def _mentions_tools(request: Mapping[str, Any]) -> bool:
    """A chat request with tools, or with calls or tool results in its history."""
    messages = request.get("messages")
    if messages is None:
        return False
    return bool(request.get("tools")) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
