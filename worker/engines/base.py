"""The engine contract: what the job runner (worker/jobs.py) asks of an engine, whichever it is (the
built-in transformers engine, an HTTP server's), and the engine-neutral shapes they exchange.

The runner owns everything around generation (the claim, the `running` status, deadlines, cancel, token
events and their indexes, output webhooks, the final write, handing a job back); an engine owns only
generation: the job's request in, per output (`choice`) text with its tokens' logprobs out, then each
output's finish reason and the token counts. A job re-run after its worker died asks the engine whether
it can continue the text it had published (`continues`); if so the engine gets that text per output and
goes on after it, counting its tokens as generated.

Tokens go to the runner through a `TokenSink` the runner hands in, called as they come (no queue between
an engine's step and the job's events: one call per piece).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.capabilities import Capabilities
from shared.states import FinishReason


class EngineUnavailable(Exception):
    """The engine went away under a running job and is coming back (a supervised server restarting):
    the job goes back to the queue, to continue from its published text, instead of failing."""


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    peak_batch_size: int = 0
    last_batch_size: int = 0
    active: int = 0


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One claimed job as an engine sees it."""

    key: str  # names the job's requests in the engine: "<job id>#<attempt>"
    request: dict[str, Any]  # as stored with the job (shared.schemas), already checked at submit
    n: int  # outputs asked for
    max_tokens: int  # per output, the text it continues included
    resumes: Sequence[str]  # per output, the text earlier attempts published, which this one continues
    prompt_tokens: int | None  # as the API counted them at submit (None: not counted)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a generation ended, read once it returned (or was never run: a job stopped before it
    started still has its continued text and its prompt)."""

    reasons: Sequence[FinishReason]  # per output, as the engine ended it: stop, length or tool_calls
    prompt_tokens: int
    completion_tokens: int  # every output's, the continued texts' tokens included
    generated: int  # of them, the tokens this attempt generated, by the engine's final count


class TokenSink(Protocol):
    """Where an engine puts what it generates (the runner: token events, metrics, the record)."""

    def tokens(
        self, choice: int, text: str, logprobs: list[dict[str, Any]] | None, count: int, batch_size: int = 0
    ) -> None:
        """New output of one choice: `text` (may be empty: held back, e.g. half a character), the
        logprobs (shared.logprobs' shape) of the tokens it is made of, None when not asked for, how many
        tokens were generated, and the batch they were generated in (0: unknown)."""

    def end(self, choice: int, text: str = "") -> None:
        """A choice's last text (what was held back) or none; the runner flushes what it holds."""


class Generation(Protocol):
    """One job's generation in an engine: built synchronously (a bad request fails here), run once."""

    async def run(self, sink: TokenSink) -> None:
        """Generate every output until it ends or `cancel` is called; raises EngineUnavailable when a
        supervised engine went away, any other exception when the job fails."""

    def cancel(self) -> None:
        """Stop generating (a cancel, a deadline, the worker stopping); what was generated stays."""

    def outcome(self) -> Outcome: ...


class Engine(Protocol):
    """What the worker asks of an engine: its life (start, warm-up, health, stop), what it honours, and
    one generation per job."""

    name: str
    stats: EngineStats

    @property
    def healthy(self) -> bool:
        """False once the engine cannot serve any more (the worker then stops, for a fresh start)."""

    def capabilities(self) -> Capabilities: ...

    def start(self) -> None:
        """Start in process (threads, managers); called from the event loop that runs the jobs."""

    async def warmup(self) -> None:
        """Return once the engine serves (fails the worker's start-up when it cannot)."""

    def stop(self) -> None:
        """Stop at once (called in a thread at shutdown); jobs still running go back to the queue."""

    async def aclose(self) -> None:
        """Release what `stop` could not (connections), on the event loop."""

    def continues(self, request: Mapping[str, Any]) -> bool:
        """Whether a re-run of `request` can continue the text an earlier attempt published."""

    def generation(self, job: GenerationJob) -> Generation: ...
