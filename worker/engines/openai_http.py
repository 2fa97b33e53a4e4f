"""The `openai-http` engine: jobs forwarded to any OpenAI-compatible server someone else runs (SGLang,
TGI, `transformers serve`, a vLLM), with what its operator declares it honours
(INFERQ_WORKER__UPSTREAM_CAPABILITIES; by default only what every such server honours, `seed` and `stop`:
shared.capabilities.openai_http_engine). A declared field is forwarded and mapped back as on the vllm
engine; the API refuses the rest at submit.

A job re-run after its worker died starts over here: continuing an assistant message is an extension
not every server has (one that lacks it would answer a new message after the text instead), so the
re-run's `running` status says `resume_from_chars: 0` and a client following the stream replaces the
text it had. `--engine vllm` continues it instead.
"""

from __future__ import annotations

from shared.capabilities import Capabilities, openai_http_engine
from worker.engines.http import HttpEngine


class OpenAIHttpEngine(HttpEngine):
    name = "openai-http"

    def __init__(
        self, base_url: str, api_key: str | None, timeout: float, model: str, declared: str | None = None
    ) -> None:
        super().__init__(base_url, api_key, timeout, model)
        self._capabilities = openai_http_engine(declared)

    def capabilities(self) -> Capabilities:
        return self._capabilities
