"""The `vllm` engine: jobs forwarded to vLLM's OpenAI server, every field vLLM honours passed through
(n, logprobs and top_logprobs, response_format, seed, top_k, stop) and mapped back as the built-in engine
maps its own. The server is the worker's own (worker/engines/vllm_server.py) unless --upstream-url names
one that runs already.

A job re-run after its worker died continues the text it had published: vLLM continues the assistant
message (`continue_final_message`, no new generation prompt) on chat, and the prompt plus the text on
completions, with max_tokens less the tokens that text already is. Structured output starts over (vLLM
would apply the schema to the continuation alone, from its first character).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.capabilities import Capabilities, vllm_engine
from worker.engines.http import HttpEngine
from worker.engines.vllm_server import VllmServer


class VllmEngine(HttpEngine):
    name = "vllm"

    def __init__(
        self, base_url: str, api_key: str | None, timeout: float, model: str, server: VllmServer | None = None
    ) -> None:
        super().__init__(base_url, api_key, timeout, model)
        self.server = server
        self.supervised = server is not None

    def capabilities(self) -> Capabilities:
        return vllm_engine()

    @property
    def health_url(self) -> str:
        return f"{self.root}/health"

    async def warmup(self) -> None:
        if self.server is not None:
            await self.server.start()
        await super().warmup()

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
        fmt = request.get("response_format")
        return not (isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema"))

    def continuation(self) -> dict[str, Any]:
        return {"continue_final_message": True, "add_generation_prompt": False}

    async def token_count(self, text: str) -> int:
        resp = await self.client.post(
            f"{self.root}/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False}
        )
        resp.raise_for_status()
        return int(resp.json()["count"])
