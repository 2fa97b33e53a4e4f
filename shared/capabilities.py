"""What an engine honours for its model, declared once per engine: each worker registers its own with
its heartbeat, and the API refuses at submit, with a 400 naming the field, what the model's workers
would not honour (never a 202 followed by a failed job, never a field silently dropped)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from shared.logprobs import MAX_TOP_LOGPROBS

# Sampling fields a request may carry that an engine may not honour, in the order they are checked.
CHECKED_FIELDS = ("n", "logprobs", "top_logprobs", "seed", "top_k", "stop", "response_format")

NOT_HONOURED = (
    "{field} is not supported for model '{model}': its workers ({engines}) do not honour it; "
    "send the request without {field}"
)
TOP_LOGPROBS_OVER = (
    "top_logprobs can be at most {limit} for model '{model}' (what its workers ({engines}) return)"
)


@dataclass(frozen=True)
class Capabilities:
    engine: str
    n: bool = False  # more than one output per request
    logprobs: bool = False
    max_top_logprobs: int = 0
    seed: bool = False
    top_k: bool = False
    stop: bool = False
    structured_outputs: bool = False  # response_format json_object / json_schema
    tools: bool = False
    embeddings: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Capabilities:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def refusal(self, request: Mapping[str, Any], model: str) -> tuple[str, str] | None:
        """(param, message) for the first field of `request` (a job's request dict, or a sampling
        request's fields) these capabilities do not honour; None when all are honoured."""
        engines = self.engine

        def no(field: str) -> tuple[str, str]:
            return field, NOT_HONOURED.format(field=field, model=model, engines=engines)

        if (request.get("n") or 1) > 1 and not self.n:
            return no("n")
        if request.get("logprobs") and not self.logprobs:
            return no("logprobs")
        top = request.get("top_logprobs")
        if top and top > self.max_top_logprobs:
            if not self.logprobs or self.max_top_logprobs == 0:
                return no("top_logprobs")
            return "top_logprobs", TOP_LOGPROBS_OVER.format(
                limit=self.max_top_logprobs, model=model, engines=engines
            )
        if request.get("seed") is not None and not self.seed:
            return no("seed")
        if request.get("top_k") is not None and not self.top_k:
            return no("top_k")
        if request.get("stop") and not self.stop:
            return no("stop")
        if request.get("response_format") is not None and not self.structured_outputs:
            kind = request["response_format"]
            if not (isinstance(kind, Mapping) and kind.get("type") == "text"):
                return no("response_format")
        return None


def common(caps: Iterable[Capabilities]) -> Capabilities | None:
    """What every one of `caps` honours: any live worker of a model may take its next job (one queue
    per model, no routing by feature), so a field is safe only where all of them honour it."""
    items = list(caps)
    if not items:
        return None
    first, *rest = items
    out = first
    for c in rest:
        out = replace(
            out,
            engine=out.engine if c.engine in out.engine.split(", ") else f"{out.engine}, {c.engine}",
            n=out.n and c.n,
            logprobs=out.logprobs and c.logprobs,
            max_top_logprobs=min(out.max_top_logprobs, c.max_top_logprobs),
            seed=out.seed and c.seed,
            top_k=out.top_k and c.top_k,
            stop=out.stop and c.stop,
            structured_outputs=out.structured_outputs and c.structured_outputs,
            tools=out.tools and c.tools,
            embeddings=out.embeddings and c.embeddings,
        )
    return out


# The engines' declarations. A worker refines its own at start (e.g. structured outputs need llguidance
# to load the tokenizer); the API uses these for a model none of whose workers is live.


def transformers_engine(device: str, *, grammars: bool = True) -> Capabilities:
    """The built-in engine: its own sampler (seed, logprobs, top-k, grammar masks) runs on the device the
    logits are on, so CPU and CUDA workers honour the same fields; structured outputs need llguidance
    to have read the tokenizer (`grammars`)."""
    return Capabilities(
        engine="transformers",
        n=True,
        logprobs=True,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        seed=True,
        top_k=True,
        stop=True,
        structured_outputs=grammars,
    )


def openai_http_engine() -> Capabilities:
    """An OpenAI-compatible server behind the worker: what the worker forwards and maps back today."""
    return Capabilities(engine="openai-http", seed=True, stop=True)


def declared(engine: str, device: str) -> Capabilities:
    if engine == "openai-http":
        return openai_http_engine()
    return transformers_engine(device)
