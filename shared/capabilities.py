"""What an engine honours for its model, declared once per engine: each worker registers its own with
its heartbeat, and the API refuses at submit, with a 400 naming the field, what the model's workers
would not honour (never a 202 followed by a failed job, never a field silently dropped)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from shared.embeddings import ENDPOINT as EMBEDDINGS_ENDPOINT
from shared.logprobs import MAX_TOP_LOGPROBS

NOT_HONOURED = (
    "{field} is not supported for model '{model}': its workers ({engines}) do not honour it; "
    "send the request without {field}"
)
NOT_AN_EMBEDDING_MODEL = (
    "model '{model}' does not serve embeddings (its workers: {engines}); name an embedding model"
)
ONLY_EMBEDDINGS = "model '{model}' is an embedding model: it serves only /v1/embeddings, not text generation"
TOP_LOGPROBS_OVER = (
    "top_logprobs can be at most {limit} for model '{model}' (what its workers ({engines}) return)"
)


def _response_format_asked(value: Any) -> bool:
    return value is not None and not (isinstance(value, Mapping) and value.get("type") == "text")


# Whether a request asks for a field, in the order fields are checked; and what honours it.
_ASKED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: (v or 1) > 1,
    "logprobs": bool,
    "top_logprobs": bool,
    "seed": lambda v: v is not None,
    "top_k": lambda v: v is not None,
    "stop": bool,
    "response_format": _response_format_asked,
    "tools": bool,
}
_HONOURED_BY = {
    "n": "n",
    "logprobs": "logprobs",
    "top_logprobs": "max_top_logprobs",
    "seed": "seed",
    "top_k": "top_k",
    "stop": "stop",
    "response_format": "structured_outputs",
    "tools": "tools",
}


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
    generation: bool = True  # chat, completions, responses: False for an embedding model's workers
    dimensions: bool = False  # embeddings: shortened to a requested `dimensions` (Matryoshka models)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Capabilities:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def refusal(self, request: Mapping[str, Any], model: str) -> tuple[str, str] | None:
        """(param, message) for the first field of `request` (a job's request dict, or a sampling
        request's fields) these capabilities do not honour; None when all are honoured."""
        if request.get("endpoint") == EMBEDDINGS_ENDPOINT:
            return self._embedding_refusal(request, model)
        if not self.generation:
            return "model", ONLY_EMBEDDINGS.format(model=model)
        return self._generation_refusal(request, model)

    def _generation_refusal(self, request: Mapping[str, Any], model: str) -> tuple[str, str] | None:
        top = request.get("top_logprobs")
        if top and self.logprobs and 0 < self.max_top_logprobs < top and request.get("logprobs"):
            return "top_logprobs", TOP_LOGPROBS_OVER.format(
                limit=self.max_top_logprobs, model=model, engines=self.engine
            )
        for field, asked in _ASKED.items():
            if asked(request.get(field)) and not getattr(self, _HONOURED_BY[field]):
                return field, NOT_HONOURED.format(field=field, model=model, engines=self.engine)
        return None

    def _embedding_refusal(self, request: Mapping[str, Any], model: str) -> tuple[str, str] | None:
        if not self.embeddings:
            return "model", NOT_AN_EMBEDDING_MODEL.format(model=model, engines=self.engine)
        if request.get("dimensions") is not None and not self.dimensions:
            return "dimensions", NOT_HONOURED.format(field="dimensions", model=model, engines=self.engine)
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
            generation=out.generation and c.generation,
            dimensions=out.dimensions and c.dimensions,
        )
    return out


# The engines' declarations. A worker refines its own at start (e.g. structured outputs need llguidance
# to load the tokenizer); the API uses these for a model none of whose workers is live.


def transformers_engine(device: str, *, grammars: bool = True) -> Capabilities:
    """The built-in engine: its own sampler (seed, logprobs, top-k, grammar masks) runs on the device the
    logits are on, so CPU and CUDA workers honour the same fields; structured outputs and tools need
    llguidance to have read the tokenizer (`grammars`)."""
    return Capabilities(
        engine="transformers",
        n=True,
        logprobs=True,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        seed=True,
        top_k=True,
        stop=True,
        structured_outputs=grammars,
        tools=grammars,  # calls are enforced by the same grammar masks
    )


# What an operator may declare an OpenAI-compatible upstream honours (INFERQ_WORKER__UPSTREAM_CAPABILITIES),
# by the request field's name: each is forwarded as the vllm engine forwards it and mapped back the same
# way (worker/engines/http.py). Not `tools`: the HTTP engines do not forward tool definitions.
UPSTREAM_DECLARABLE = ("n", "logprobs", "top_logprobs", "seed", "top_k", "stop", "response_format")
# What an openai-http worker declares when the operator says nothing: what every such server honours.
UPSTREAM_DEFAULT = "seed,stop"
UNKNOWN_UPSTREAM_CAPABILITY = (
    "upstream_capabilities: unknown capability {name!r}; use a comma-separated list of "
    + ", ".join(UPSTREAM_DECLARABLE)
    + " (top_logprobs=K for at most K alternatives, {max} when K is left out), e.g. 'seed,stop,n,logprobs'"
)
BAD_UPSTREAM_CAPABILITY = "upstream_capabilities: {problem}, in {text!r}"


def parse_upstream(text: str) -> Capabilities:
    """An operator's declaration of what an OpenAI-compatible upstream honours, e.g.
    `n,logprobs,top_logprobs=20,top_k,response_format,seed,stop`; ValueError names what is wrong."""
    found: dict[str, Any] = {}
    for raw in text.split(","):
        name, eq, value = (part.strip() for part in raw.partition("="))
        if not name:
            continue
        if name not in UPSTREAM_DECLARABLE:
            raise ValueError(UNKNOWN_UPSTREAM_CAPABILITY.format(name=name, max=MAX_TOP_LOGPROBS))
        if eq and name != "top_logprobs":
            raise ValueError(BAD_UPSTREAM_CAPABILITY.format(problem=f"{name} takes no value", text=text))
        if name == "top_logprobs":
            top = int(value) if value.isdigit() else -1
            if eq and not 1 <= top <= MAX_TOP_LOGPROBS:
                problem = f"top_logprobs=K needs K from 1 to {MAX_TOP_LOGPROBS}"
                raise ValueError(BAD_UPSTREAM_CAPABILITY.format(problem=problem, text=text))
            found["max_top_logprobs"] = top if eq else MAX_TOP_LOGPROBS
        else:
            found[_HONOURED_BY[name]] = True
    if found.get("max_top_logprobs") and not found.get("logprobs"):
        problem = "top_logprobs needs logprobs (a server that returns alternatives returns logprobs)"
        raise ValueError(BAD_UPSTREAM_CAPABILITY.format(problem=problem, text=text))
    return Capabilities(engine="openai-http", **found)


def openai_http_engine(declared: str | None = None) -> Capabilities:
    """An OpenAI-compatible server behind the worker: what its operator declared it honours
    (`parse_upstream`), else only what every such server honours (seed, stop)."""
    return parse_upstream(declared if declared is not None else UPSTREAM_DEFAULT)


def vllm_engine() -> Capabilities:
    """vLLM's OpenAI server behind the worker (`--engine vllm`): the worker forwards each of these and
    maps vLLM's answer (its choices, logprobs, usage) into inferq's events and records. vLLM's own
    limit on logprobs (`--max-logprobs`, 20 by default) is OpenAI's, inferq's too. Tools need vLLM's
    structured outputs to reach llguidance (its default backend, `auto`, does for inferq's Lark grammars)."""
    return Capabilities(
        engine="vllm",
        n=True,
        logprobs=True,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        seed=True,
        top_k=True,
        stop=True,
        structured_outputs=True,
        tools=True,  # inferq's own tool grammar, as a structured-outputs grammar (worker/engines/vllm.py)
    )


def embedding_engine(*, shortening: bool, engine: str = "embeddings") -> Capabilities:
    """A worker serving a sentence-transformers model: embeddings only, in process (worker/embedder.py)
    or through vLLM's pooling (`engine="vllm"`, worker/engines/vllm_embedder.py)."""
    return Capabilities(engine=engine, embeddings=True, generation=False, dimensions=shortening)


def declared(engine: str, device: str, upstream: str | None = None) -> Capabilities:
    if engine == "openai-http":
        return openai_http_engine(upstream)
    if engine == "vllm":
        return vllm_engine()
    return transformers_engine(device)
