"""Tool calls out of a model's text: one parser per call format, in the shape of vLLM's tool parsers
(`vllm/entrypoints/openai/tool_parsers/`), used in one place for every view (the job record, chat
completions streamed or not, Responses, batch output lines) and by the worker for its finish_reason.

A call's `arguments` are the JSON text exactly as the model wrote it (no re-encoding), so that the
pieces a stream sends join into the same string a non-streamed answer gives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from shared.tools import CALL_END, CALL_START, calls_allowed

CALL_ID_PREFIX = "call_"
FUNCTION_CALL_ITEM_PREFIX = "fc_"


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON text


@dataclass(slots=True)
class Parsed:
    """A finished answer: its text outside the calls (None when there is none) and its calls."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


@dataclass(slots=True)
class PartialCall:
    name: str
    arguments: str  # as much of the arguments as the model has written
    complete: bool


@dataclass(slots=True)
class Partial:
    """An answer being generated: the text that is surely content, and the calls begun so far."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)


def call_id(job_id: str, index: int, choice: int = 0) -> str:
    """The id of a job's `index`-th call: derived, not stored, so that every view of the job (and a
    later request that answers the call) names it the same."""
    base = CALL_ID_PREFIX + job_id.removeprefix("job_")
    return f"{base}_{index}" if choice == 0 else f"{base}_{choice}_{index}"


def item_id(job_id: str, index: int) -> str:
    """The id of a response's `index`-th function_call output item."""
    return f"{FUNCTION_CALL_ITEM_PREFIX}{job_id.removeprefix('job_')}_{index}"


_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"')
_ARGUMENTS_KEY = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def _json_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at `start` ends (exclusive); None while it is unfinished."""
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return int(end)


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (not yet content)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesToolParser:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, calls after any text (as vLLM's
    `hermes` parser reads them)."""

    name = "hermes"

    def _call(self, body: str) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        found = _ARGUMENTS_KEY.search(body)
        if found is None:
            return ParsedCall(data["name"], "{}")
        end = _json_end(body, found.end())
        if end is None:
            return None
        return ParsedCall(data["name"], body[found.end() : end])

    def extract(self, text: str) -> Parsed:
        """The calls of a finished answer. A last call cut short (by max_tokens) is left out, the calls
        before it kept; text that does not read as calls (written freely by an unconstrained model) is
        all content, with no calls."""
        start = text.find(CALL_START)
        if start < 0:
            return Parsed(text)
        calls = []
        rest = text[start:]
        while rest.startswith(CALL_START):
            end = self._body_end(rest)
            if end < 0:
                if self._cut_short(rest[len(CALL_START) :]):
                    break
                return Parsed(text)
            call = self._call(rest[len(CALL_START) : end])
            if call is None:
                return Parsed(text)
            calls.append(call)
            rest = rest[end + len(CALL_END) :].lstrip()
        else:
            if rest:  # text after the calls: not a format this parser knows
                return Parsed(text)
        content = text[:start]
        return Parsed(content if content.strip() else None, calls)

    @staticmethod
    def _closed_at(rest: str) -> int:
        """The index of the closing marker of the call `rest` starts with, once the call's JSON body is
        finished and the marker follows it; -1 before. The JSON is read first, so that a marker inside
        one of its strings (`{"city": "</tool_call>"}`, which the grammar allows) is not taken for it."""
        at = len(CALL_START)
        at += len(rest[at:]) - len(rest[at:].lstrip())
        finish = _json_end(rest, at)
        if finish is None:
            return -1
        close = finish + len(rest[finish:]) - len(rest[finish:].lstrip())
        return close if rest.startswith(CALL_END, close) else -1

    @classmethod
    def _body_end(cls, rest: str) -> int:
        """Where the body of the finished call `rest` starts with ends (the index of its closing marker;
        -1 when there is none): after its JSON, else (text that is not JSON) at the first marker."""
        close = cls._closed_at(rest)
        return close if close >= 0 else rest.find(CALL_END)

    def _cut_short(self, body: str) -> bool:
        """Whether an unfinished call's text is the start of a call (so its answer ran out of tokens)."""
        return _NAME.match(body) is not None or body.strip() in ("", "{") or body.lstrip().startswith('{"')

    def partial(self, text: str) -> Partial:
        """What of an answer being generated is surely content, and the calls begun in it."""
        start = text.find(CALL_START)
        content = text if start < 0 else text[:start]
        if start < 0:
            content = content[: len(content) - _held_back(content, CALL_START)]
        out = Partial(content if content.strip() else "")  # blank so far: maybe no content at all
        if start < 0:
            return out
        # Call by call, each call's end found by reading its JSON first (`_closed_at`): a marker inside
        # a string argument neither ends a call nor begins one, so its arguments stream on through it.
        rest = text[start:]
        while rest.startswith(CALL_START):
            close = self._closed_at(rest)
            body = rest[len(CALL_START) :] if close < 0 else rest[len(CALL_START) : close]
            named = _NAME.match(body)
            if named is None:
                call = self._call(body) if close >= 0 else None
                if call is None:
                    break
                out.calls.append(PartialCall(call.name, call.arguments, True))
            else:
                found = _ARGUMENTS_KEY.search(body, named.end())
                if found is None:
                    out.calls.append(PartialCall(named.group(1), "", False))
                    break
                finish = _json_end(body, found.end())
                arguments = body[found.end() : finish] if finish is not None else body[found.end() :]
                out.calls.append(PartialCall(named.group(1), arguments, finish is not None))
                if finish is None:
                    break
            if close < 0:
                break
            rest = rest[close + len(CALL_END) :].lstrip()
        return out


PARSERS: dict[str, type[HermesToolParser]] = {HermesToolParser.name: HermesToolParser}


def parser_for(template: str | None = None) -> HermesToolParser:
    """The parser of the call format a model writes: Hermes' for every model so far (a template of
    another format is not given the tools; shared/tools.py shows them in Hermes' format instead)."""
    return HermesToolParser()


def chat_tool_calls(job_id: str, calls: list[ParsedCall], choice: int = 0) -> list[dict[str, Any]]:
    """Calls as chat completions' `message.tool_calls` (and the job record's `tool_calls`)."""
    return [
        {
            "id": call_id(job_id, i, choice),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


def parsed_answer(request: dict[str, Any], text: str | None) -> Parsed | None:
    """A job's answer split into content and calls; None for a job whose answer may not hold calls
    (no tools, or tool_choice `none`), whose text is all content."""
    if not calls_allowed(request):
        return None
    return parser_for().extract(text or "")


@dataclass(frozen=True, slots=True)
class CallDelta:
    """What is new in an answer being streamed: `content` text; or the start of call `index` (`name`
    set); or a piece of its `arguments`; or its end (`done`, with `arguments` then the whole)."""

    content: str = ""
    index: int = -1
    name: str | None = None
    arguments: str = ""
    done: bool = False


class CallStream:
    """An answer's text, each time it has grown, turned into what is new of its content and calls: the
    content before a call marker, then each call's name once written and its arguments as written. Its
    `finish` sends the rest as the finished answer parses (so a stream joins into the same content and
    calls as the answer given whole)."""

    def __init__(self, parser: HermesToolParser | None = None) -> None:
        self.parser = parser or parser_for()
        self._content = 0  # characters of content sent
        self._sent: list[int] = []  # per call begun: characters of its arguments sent
        self._closed: set[int] = set()

    def feed(self, text: str) -> list[CallDelta]:
        partial = self.parser.partial(text)
        out = self._content_delta(partial.content)
        for i, call in enumerate(partial.calls):
            out += self._call_deltas(i, call.name, call.arguments, call.complete)
        return out

    def finish(self, text: str) -> list[CallDelta]:
        parsed = self.parser.extract(text)
        out = self._content_delta(parsed.content or "")
        for i, call in enumerate(parsed.calls):
            out += self._call_deltas(i, call.name, call.arguments, True)
        return out

    @property
    def calls(self) -> int:
        return len(self._sent)

    def _content_delta(self, content: str) -> list[CallDelta]:
        if len(content) <= self._content or self._sent:
            return []  # nothing new, or calls have begun (content comes before them)
        piece, self._content = content[self._content :], len(content)
        return [CallDelta(content=piece)]

    def _call_deltas(self, i: int, name: str, arguments: str, complete: bool) -> list[CallDelta]:
        out = []
        if i == len(self._sent):
            self._sent.append(0)
            out.append(CallDelta(index=i, name=name))
        if i in self._closed:
            return out
        if len(arguments) > self._sent[i]:
            out.append(CallDelta(index=i, arguments=arguments[self._sent[i] :]))
            self._sent[i] = len(arguments)
        if complete:
            self._closed.add(i)
            out.append(CallDelta(index=i, arguments=arguments, done=True))
        return out


@dataclass(frozen=True, slots=True)
class CallSpan:
    """Where one call lies in an answer's text: its marker's start, the end of its name (once written),
    its arguments' start and end (None while unfinished), and the end of its closing marker."""

    start: int
    name: str | None = None
    name_end: int | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None
    end: int | None = None


def call_spans(text: str) -> tuple[int, list[CallSpan]]:
    """The end of an answer's content (before its first call marker, or before what could be the start
    of one) and where its calls lie, for views numbered by position in the text (Responses' stream)."""
    start = text.find(CALL_START)
    if start < 0:
        return len(text) - _held_back(text, CALL_START), []
    spans = []
    at = start
    while at >= 0:
        body_start = at + len(CALL_START)
        named = _NAME.match(text, body_start)
        if named is None:
            spans.append(CallSpan(at))
            break
        found = _ARGUMENTS_KEY.search(text, named.end())
        if found is None:
            spans.append(CallSpan(at, named.group(1), named.end()))
            break
        finish = _json_end(text, found.end())
        close = text.find(CALL_END, finish) if finish is not None else -1
        end = close + len(CALL_END) if close >= 0 else None
        spans.append(CallSpan(at, named.group(1), named.end(), found.end(), finish, end))
        if end is None:
            break
        at = text.find(CALL_START, end)
    return start, spans
