"""Structured outputs: a request's `response_format` as the JSON schema the worker's grammar enforces.

The API checks a schema with these functions at submit time and the worker compiles the same grammar,
so that what one accepts the other can run.

The grammar library is llguidance (guidance-ai, Rust, maintained, the engine behind structured outputs
in llama.cpp and one of vLLM's and SGLang's backends), chosen over xgrammar and outlines-core for this
CPU-first project:
- CPU speed: it computes each token mask on the fly from a lexer over the vocabulary (tens of µs per
  mask here) with no ahead-of-time compilation, so a new schema costs milliseconds instead of a
  per-schema token-mask precomputation; masks are for rows on the CPU anyway;
- coverage: it reports any JSON-schema keyword it does not implement as an error instead of ignoring
  it (the silent ignoring is what llama.cpp's users complain about), so a 400 here means a schema we
  would not have enforced;
- weight: one abi3 wheel with no dependencies, where xgrammar 0.2 requires torch and triton.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema
from llguidance import LLMatcher

# A JSON object with any content: what `{"type": "json_object"}` asks for.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# One space after ',' and ':' and no other whitespace: with flexible whitespace a small model can spend
# its whole max_tokens on newlines inside an object that is never closed.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

SCHEMA_TOO_LARGE = "the JSON schema is {size} bytes; the limit is {limit}"
SCHEMA_INVALID = "the JSON schema is not valid: {error}"
SCHEMA_UNSUPPORTED = "the JSON schema cannot be enforced: {error}"
SCHEMA_PARAM = "response_format.json_schema.schema"


class SchemaError(ValueError):
    """A response format whose schema is invalid, unsupported or too large; `param` names the field."""

    def __init__(self, message: str, param: str = SCHEMA_PARAM) -> None:
        super().__init__(message)
        self.param = param


def schema_of(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a stored `response_format` asks for; None for plain text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else ANY_OBJECT
    return None


def canonical(schema: dict[str, Any]) -> str:
    """The cache key of a schema: the same schema written with keys in another order compiles once."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=512)
def grammar(schema_json: str) -> str:
    """The llguidance grammar of a canonical schema, checked; raises SchemaError.

    The schema is checked against its JSON Schema meta-schema first, so that a malformed schema is
    told apart from a valid one that uses a keyword llguidance does not implement."""
    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(SCHEMA_INVALID.format(error=exc.message)) from None
    try:
        built = LLMatcher.grammar_from_json_schema(schema_json, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise SchemaError(SCHEMA_UNSUPPORTED.format(error=exc)) from None
    error = LLMatcher.validate_grammar(built)
    if error:
        raise SchemaError(SCHEMA_UNSUPPORTED.format(error=error.strip()))
    return built


def check(response_format: dict[str, Any] | None, max_bytes: int) -> None:
    """Submit-time check of a response format: raises SchemaError naming the field."""
    schema = schema_of(response_format)
    if schema is None:
        return
    key = canonical(schema)
    if len(key.encode()) > max_bytes:
        raise SchemaError(SCHEMA_TOO_LARGE.format(size=len(key.encode()), limit=max_bytes))
    grammar(key)
