"""`inferq batch`: run a JSONL file of requests through the API's OpenAI-style Batch API and fetch the
results; also `inferq batch status ID` and `inferq batch cancel ID`."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
# Fields only one of the two `input` endpoints has: they tell a body's endpoint without asking the API.
_RESPONSES_ONLY = ("instructions", "max_output_tokens", "previous_response_id", "text", "background", "store")
_EMBEDDINGS_ONLY = ("encoding_format", "dimensions")
TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_SECONDS = 0.5
_LINE_END = re.compile(r"\r\n|\r|\n")
# How long polling rides out a lost connection (e.g. an API restart) before giving up; the batch itself
# keeps running server-side either way.
RECONNECT_SECONDS = 30.0
TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "expires_at",
)

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# The same option as cli.UrlOpt; repeated here because cli.py imports this module, not the other way round.
UrlOpt = Annotated[str, typer.Option("--url", envvar="INFERQ_URL", help="Base URL of a running inferq API.")]
# Shared with cli.py's client commands. No default is shown, and the key is never printed.
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="INFERQ_API_KEY", show_default=False, help="API key (from `inferq keys create`)."
    ),
]


def fail(resp: httpx.Response, console: Console) -> NoReturn:
    """Say what the API refused (its error envelope's message), then exit 1."""
    try:
        message = resp.json()["error"]["message"]
    except Exception:
        message = resp.text
    console.print(f"[red]error {resp.status_code}:[/] {message}")
    raise typer.Exit(1)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers that carry `api_key` (none without one)."""
    return {"Authorization": f"Bearer {api_key.strip()}"} if api_key and api_key.strip() else {}


class BatchInputError(ValueError):
    """The input file cannot become one batch; the message names the offending line."""


@dataclass
class BatchInput:
    endpoint: str
    requests: list[dict[str, Any]]
    numbers: list[int]  # each request's line in the input file

    def jsonl(self) -> bytes:
        """The batch file, each request on its input line (blank lines between), so the line numbers the
        server gives in its errors are the input file's."""
        out: list[str] = []
        written = 0
        for number, request in zip(self.numbers, self.requests, strict=True):
            out.append("\n" * (number - written - 1) + json.dumps(request, ensure_ascii=False) + "\n")
            written = number
        return "".join(out).encode()


def _is_full_line(obj: Any) -> bool:
    return isinstance(obj, dict) and "url" in obj and "body" in obj


def _body_of(obj: Any, n: int, endpoint: str | None) -> dict[str, Any]:
    if isinstance(obj, str):
        # A bare string is one user turn, or the prompt itself when the whole file goes to /v1/completions,
        # or the input of an embedding or a response.
        if endpoint == COMPLETIONS:
            return {"prompt": obj}
        if endpoint in (EMBEDDINGS, RESPONSES):
            return {"input": obj}
        return {"messages": [{"role": "user", "content": obj}]}
    if isinstance(obj, dict):
        return dict(obj)
    raise BatchInputError(f"line {n}: expected a JSON object or string, got {type(obj).__name__}")


ModelKind = Callable[[str], bool]  # whether a model serves embeddings


def _input_endpoint(body: dict[str, Any], model: str, embeds: ModelKind) -> str:
    """/v1/embeddings or /v1/responses for a body with `input`: by the fields only one of them has,
    else by the model (an embedding model, as GET /v1/models says, takes embeddings)."""
    if any(k in body for k in _RESPONSES_ONLY):
        return RESPONSES
    if any(k in body for k in _EMBEDDINGS_ONLY):
        return EMBEDDINGS
    return EMBEDDINGS if embeds(model) else RESPONSES


def _wrap(
    obj: Any, n: int, endpoint: str | None, default_model: Callable[[], str], embeds: ModelKind
) -> dict[str, Any]:
    """Turn one convenience line (a request body, maybe with a custom_id) into a full batch line."""
    body = _body_of(obj, n, endpoint)
    custom_id = body.pop("custom_id", None)
    url = endpoint
    if url is None:
        if "messages" in body:
            url = CHAT
        elif "prompt" in body:
            url = COMPLETIONS
        elif "input" not in body:
            raise BatchInputError(
                f"line {n}: a request body needs 'messages', 'prompt' or 'input' (or pass --endpoint)"
            )
    if "model" not in body:
        body["model"] = default_model()
    if url is None:
        url = _input_endpoint(body, str(body["model"]), embeds)
    return {
        "custom_id": f"line-{n}" if custom_id is None else str(custom_id),
        "method": "POST",
        "url": url,
        "body": body,
    }


def build_batch_input(
    text: str,
    endpoint: str | None,
    default_model: Callable[[], str],
    embeds: ModelKind = lambda _: False,
) -> BatchInput:
    """Parse a JSONL file's text into full OpenAI batch lines, all for one endpoint.

    Full lines pass unchanged; other lines are request bodies wrapped here (custom_id `line-<n>` by the
    1-based line number in the file). `default_model` is asked, at most once, only for bodies without a model;
    `embeds` only for a body with `input` whose fields do not tell embeddings from a response.
    """
    cached: list[str] = []

    def model() -> str:
        if not cached:
            cached.append(default_model())
        return cached[0]

    requests: list[dict[str, Any]] = []
    numbers: list[int] = []
    first: tuple[int, str] | None = None  # (line number, url) of the first request, for the mismatch error
    seen: dict[str, int] = {}
    # Lines end where the server ends them (\r\n, \r or \n), so its line numbers are these; str.splitlines
    # would also cut at U+2028 and U+0085, which JSON allows raw inside a string.
    for n, raw in enumerate(_LINE_END.split(text), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BatchInputError(f"line {n}: not valid JSON ({exc.msg})") from None
        line = obj if _is_full_line(obj) else _wrap(obj, n, endpoint, model, embeds)
        url = str(line["url"])
        if first is None:
            first = (n, endpoint or url)
        if url != first[1]:
            where = "--endpoint" if endpoint else f"line {first[0]}"
            raise BatchInputError(
                f"line {n} goes to {url} but {where} goes to {first[1]}: a batch has a single endpoint, "
                "so split the file by endpoint"
            )
        custom_id = str(line.get("custom_id"))
        if custom_id in seen:
            raise BatchInputError(
                f"line {n}: custom_id {custom_id!r} is already used on line {seen[custom_id]}"
            )
        seen[custom_id] = n
        requests.append(line)
        numbers.append(n)
    if first is None:
        raise BatchInputError("the file has no requests")
    return BatchInput(first[1], requests, numbers)


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--metadata")
        metadata[key] = value
    return metadata


def _api_error(resp: httpx.Response, exit_code: int = 1) -> NoReturn:
    try:
        message = resp.json()["error"]["message"]
    except Exception:
        message = resp.text
    err.print(f"[red]error {resp.status_code}:[/] {escape(str(message))}", soft_wrap=True)
    raise typer.Exit(exit_code)


def _json(resp: httpx.Response, ok: int = 200) -> dict[str, Any]:
    if resp.status_code != ok:
        _api_error(resp)
    data: dict[str, Any] = resp.json()
    return data


def _usage_error(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=httpx.Timeout(60.0)) as client:
        yield client


def _first_model(client: httpx.Client) -> str:
    models = _json(client.get("/v1/models")).get("data") or []
    if not models:
        _usage_error("the API serves no model yet (no live worker); pass --model")
    return str(models[0]["id"])


def _embedding_models(client: httpx.Client) -> ModelKind:
    """Whether a model serves embeddings, as GET /v1/models says (asked once, when first needed)."""
    known: dict[str, bool] = {}

    def embeds(model: str) -> bool:
        if not known:
            for m in _json(client.get("/v1/models")).get("data") or []:
                known[str(m["id"])] = bool((m.get("capabilities") or {}).get("embeddings"))
        return known.get(model, False)

    return embeds


def _counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    c = batch.get("request_counts") or {}
    return int(c.get("total") or 0), int(c.get("completed") or 0), int(c.get("failed") or 0)


def _poll(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    """GET the batch, riding out a lost connection for a while."""
    lost_since: float | None = None
    while True:
        try:
            return _json(client.get(f"/v1/batches/{batch_id}"))
        except httpx.TransportError as exc:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > RECONNECT_SECONDS:
                err.print(f"[red]lost the API:[/] {escape(str(exc))}")
                err.print(f"the batch keeps running; check it later with `inferq batch status {batch_id}`")
                raise typer.Exit(1) from None
            time.sleep(POLL_SECONDS)


def _wait(client: httpx.Client, batch: dict[str, Any]) -> dict[str, Any]:
    columns = (
        TextColumn("{task.description:<11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed[/]"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(batch["status"], total=None, failed=0)
        while batch["status"] not in TERMINAL:
            time.sleep(POLL_SECONDS)
            batch = _poll(client, batch["id"])
            total, completed, failed = _counts(batch)
            # total is 0 while the server is still validating the file: keep the bar indeterminate.
            progress.update(
                task,
                description=batch["status"],
                total=total or None,
                completed=completed + failed,
                failed=failed,
            )
    return batch


def _download(client: httpx.Client, file_id: str, path: Path) -> None:
    with client.stream("GET", f"/v1/files/{file_id}/content") as resp:
        if resp.status_code != 200:
            resp.read()
            _api_error(resp)
        with path.open("wb") as f:
            for chunk in resp.iter_bytes():
                f.write(chunk)


def _finish(client: httpx.Client, batch: dict[str, Any], out: Path, errors: Path) -> NoReturn:
    status = batch["status"]
    if status == "failed":
        err.print(f"[red]batch {batch['id']} failed[/]")
        for e in (batch.get("errors") or {}).get("data") or []:
            where = f"line {e['line']}: " if e.get("line") is not None else ""
            err.print(f"  {where}{escape(str(e.get('message')))}", soft_wrap=True)
        raise typer.Exit(1)
    if batch.get("output_file_id"):
        _download(client, batch["output_file_id"], out)
    else:
        out.write_bytes(b"")
    written = [str(out)]
    if batch.get("error_file_id"):
        _download(client, batch["error_file_id"], errors)
        written.append(str(errors))
    _, completed, failed = _counts(batch)
    colour = "green" if status == "completed" else "yellow"
    console.print(
        f"[{colour}]{status}[/]: {completed} completed, {failed} failed; wrote {escape(', '.join(written))}",
        soft_wrap=True,
    )
    raise typer.Exit(0 if status == "completed" else 1)


def _run(
    path: Path,
    out: Path,
    errors: Path | None,
    endpoint: str | None,
    model: str | None,
    metadata: dict[str, str],
    wait: bool,
    url: str,
    api_key: str | None,
) -> NoReturn:
    if not path.is_file():
        _usage_error(f"no such file: {path}")
    # Checked now rather than after a long batch has run.
    for target in (out, errors):
        if target is not None and not target.parent.is_dir():
            _usage_error(f"directory {target.parent} does not exist")
    text = path.read_text(encoding="utf-8")
    with _client(url, api_key) as client:
        try:
            batch_input = build_batch_input(
                text, endpoint, lambda: model or _first_model(client), _embedding_models(client)
            )
        except BatchInputError as exc:
            _usage_error(f"{path}: {exc}")
        files = {"file": (path.name, batch_input.jsonl(), "application/jsonl")}
        resp = client.post("/v1/files", files=files, data={"purpose": "batch"})
        if resp.status_code in (400, 413):
            # The server read the file and refused it (its message names the file and the bad lines):
            # bad input, as if the checks above had found it.
            _api_error(resp, exit_code=2)
        uploaded = _json(resp)
        body = {
            "input_file_id": uploaded["id"],
            "endpoint": batch_input.endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }
        batch = _json(client.post("/v1/batches", json=body))
        console.print(batch["id"], soft_wrap=True)
        if not wait:
            err.print(f"check it with `inferq batch status {batch['id']}`")
            raise typer.Exit(0)
        try:
            batch = _wait(client, batch)
        except KeyboardInterrupt:
            err.print(
                f"\nstopped waiting; batch {batch['id']} keeps running on the server. "
                f"Check it with `inferq batch status {batch['id']}`",
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
        _finish(client, batch, out, errors or out.with_suffix(".errors.jsonl"))


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(float(ts)).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _status(batch_id: str, as_json: bool, url: str, api_key: str | None) -> None:
    with _client(url, api_key) as client:
        batch = _json(client.get(f"/v1/batches/{batch_id}"))
    if as_json:
        sys.stdout.write(json.dumps(batch, indent=2) + "\n")
        return
    total, completed, failed = _counts(batch)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def row(name: str, value: Any) -> None:
        table.add_row(name, Text(str(value)))  # Text: server-given strings are not rich markup

    row("id", batch["id"])
    row("status", batch["status"])
    row("endpoint", str(batch.get("endpoint")))
    row("requests", f"{total} total, {completed} completed, {failed} failed")
    for key in TIMESTAMPS:
        if batch.get(key) is not None:
            row(key.removesuffix("_at").replace("_", " "), _when(batch[key]))
    for key in ("input_file_id", "output_file_id", "error_file_id"):
        row(key.removesuffix("_id").replace("_", " "), str(batch.get(key) or "-"))
    if batch.get("metadata"):
        row("metadata", ", ".join(f"{k}={v}" for k, v in batch["metadata"].items()))
    for e in (batch.get("errors") or {}).get("data") or []:
        row("error", f"line {e.get('line')}: {e.get('message')}")
    console.print(table)


def _cancel(batch_id: str, url: str, api_key: str | None) -> None:
    with _client(url, api_key) as client:
        batch = _json(client.post(f"/v1/batches/{batch_id}/cancel"))
    console.print(f"{batch['id']}: {batch['status']}", markup=False)


def batch(
    target: Annotated[
        str, typer.Argument(metavar="FILE|status|cancel", help="A JSONL file of requests, or a subcommand.")
    ],
    batch_id: Annotated[
        str | None, typer.Argument(metavar="BATCH_ID", help="The batch, for status and cancel.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where the results go (JSONL).")] = None,
    errors: Annotated[
        Path | None,
        typer.Option("--errors", help="Where failed requests go (default: OUT with suffix .errors.jsonl)."),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            help=f"{', '.join(ENDPOINTS)} (default: by each body: messages, prompt, or input: embeddings "
            "for an embedding model, else responses)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model for bodies without one (default: the API's first model).")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE for the batch; repeatable.")
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Print the batch id and return without waiting.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="status: print the raw batch object.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """Run a JSONL file of requests as one batch (OpenAI Batch API), or look at one.

    inferq batch PROMPTS.jsonl --out RESULTS.jsonl   upload, run, wait, download the results
    inferq batch status BATCH_ID [--json]            show a batch
    inferq batch cancel BATCH_ID                     cancel a batch

    The first argument is status, cancel or a file (write ./status for a file named status).
    A line of the file is a full batch line {"custom_id", "method", "url", "body"}, a request body
    such as {"messages": [...]}, {"prompt": "..."} or {"input": "..."} (optional "custom_id", default
    line-N), or a JSON string (one user message, or the input with --endpoint /v1/embeddings or
    /v1/responses). A body with "input" goes to /v1/embeddings when its model is an embedding model,
    else to /v1/responses. All lines must go to the same endpoint.
    Ctrl-C stops waiting only: the batch keeps running on the server.
    Exit status: 0 completed, 1 failed, expired or cancelled, 2 bad input.
    """
    if target in ("status", "cancel"):
        if batch_id is None:
            raise typer.BadParameter(f"`inferq batch {target}` needs a BATCH_ID", param_hint="BATCH_ID")
        if target == "status":
            _status(batch_id, as_json, url, api_key)
        else:
            _cancel(batch_id, url, api_key)
        return
    if batch_id is not None:
        raise typer.BadParameter(f"unexpected extra argument {batch_id!r}", param_hint="BATCH_ID")
    if out is None:
        raise typer.BadParameter("a batch file needs --out RESULTS.jsonl", param_hint="--out")
    _run(
        Path(target), out, errors, endpoint, model, parse_metadata(metadata or []), not no_wait, url, api_key
    )
