"""The `openai-http` engine: jobs forwarded to any OpenAI-compatible server someone else runs (SGLang,
TGI, `transformers serve`, a vLLM), with only what such a server is known to honour: `seed` and `stop`
(shared.capabilities.openai_http_engine; the API refuses the rest at submit).

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

    def capabilities(self) -> Capabilities:
        return openai_http_engine()
