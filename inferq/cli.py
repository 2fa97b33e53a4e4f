"""The `inferq` command line."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Annotated, Any

import httpx
import typer
from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inferq import batch_cli, keys_cli, webhooks_cli
from inferq.batch_cli import ApiKeyOpt, auth_headers, fail
from shared.headers import PREFER
from shared.settings import MissingUrls, ModelDirMissing, Settings, get_settings

app = typer.Typer(help="inferq: queue-backed LLM inference jobs.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Manage the model files.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(keys_cli.app, name="keys")
app.add_typer(webhooks_cli.app, name="webhooks")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)
# The keys of `inferq up`'s stack file (inferq/stack.py) that hold each variable's value.
_STACK_KEYS = {"INFERQ_REDIS_URL": "redis_url", "INFERQ_DATABASE_URL": "database_url"}

ENGINES = ("transformers", "vllm", "openai-http")
UrlOpt = Annotated[str, typer.Option("--url", envvar="INFERQ_URL", help="Base URL of a running inferq API.")]


def _require_servers(settings: Settings) -> tuple[str, str]:
    """The servers' URLs, or one line that says which are missing and where to find them; exit 2."""
    from inferq.stack import stack_file

    try:
        return settings.require_urls()
    except MissingUrls as exc:
        where = stack_file(settings)
        verb, them = ("is", "it") if len(exc.names) == 1 else ("are", "them")
        keys = ", ".join(_STACK_KEYS[n] for n in exc.names)
        err.print(
            f"[red]error:[/] {' and '.join(exc.names)} {verb} not set: point {them} at your servers, or "
            f"copy {them} from {escape(str(where))} ({keys}), which a running `inferq up` writes; "
            "`inferq up` alone runs the whole stack with embedded servers",
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


def _require_model(settings: Settings) -> None:
    try:
        settings.require_model_dir()
    except ModelDirMissing as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _logging(settings: Settings) -> None:
    from shared import logs

    logs.configure(settings.log_level, settings.log_format)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (one per GPU).")] = 1,
    device: Annotated[
        str | None, typer.Option(help="Device for every worker (default: one GPU each, else cpu).")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="Where embedded servers and models keep data.")] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="transformers (the default) or vllm (each worker runs vLLM's server beside it)."),
    ] = None,
    embeddings: Annotated[
        bool,
        typer.Option(
            "--embeddings", help="Also run an embedding worker (all-MiniLM-L6-v2) for /v1/embeddings."
        ),
    ] = False,
) -> None:
    """Run the whole stack on this machine (embedded Valkey + PostgreSQL unless URLs are set)."""
    from inferq.stack import up as run_up

    if data_dir:
        os.environ["INFERQ_DATA_DIR"] = data_dir
    if engine is not None:
        if engine not in ("transformers", "vllm"):
            raise typer.BadParameter("must be transformers or vllm", param_hint="--engine")
        os.environ["INFERQ_WORKER__ENGINE"] = engine  # the API and the workers it starts read it
    get_settings.cache_clear()
    raise typer.Exit(run_up(get_settings(), host, port, workers, device, embeddings))


FromStdinOpt = Annotated[
    bool,
    typer.Option(
        "--settings-from-stdin",
        hidden=True,
        help="Import first, then read INFERQ_* settings as one JSON line on stdin (used by `inferq up`).",
    ),
]


def _settings_from_stdin(*modules: str) -> None:
    """`inferq up` starts its API and workers before its servers are up, so that their seconds of
    imports (torch, transformers) overlap the servers' start; the settings follow on stdin."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    line = sys.stdin.readline()
    if not line:  # `inferq up` stopped before it could say where the servers are
        raise typer.Exit(0)
    os.environ.update({k: str(v) for k, v in json.loads(line).items() if k.startswith("INFERQ_")})
    get_settings.cache_clear()


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    processes: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
    settings_from_stdin: FromStdinOpt = False,
) -> None:
    """Serve the HTTP API (needs INFERQ_REDIS_URL and INFERQ_DATABASE_URL)."""
    if settings_from_stdin:
        _settings_from_stdin("uvicorn", "api.http.app", "transformers.models.auto.tokenization_auto")
    import uvicorn

    settings = get_settings()
    _require_servers(settings)
    _require_model(settings)
    _logging(settings)
    uvicorn.run(
        "api.http.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_level=settings.log_level.lower(),
        log_config=None,  # our handlers (text or JSON) for uvicorn's loggers too
        timeout_graceful_shutdown=5,
    )


def _worker_model(settings: Settings, model: str | None, served_name: str | None) -> None:
    if model is not None:
        # Another model than the configured one: its name is its own, not the configured model's.
        settings.model.name = model
        settings.model.served_name = served_name or ""
        settings.model.gguf_file = None
    elif served_name is not None:
        settings.model.served_name = served_name


@app.command()
def worker(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model directory or Hugging Face id (default: INFERQ_MODEL__NAME, else the demo model); "
            "a sentence-transformers directory makes an embedding worker."
        ),
    ] = None,
    served_name: Annotated[
        str | None, typer.Option(help="With --model: the name jobs use (default: the directory's name).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps.")] = None,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Requests per engine step.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Serve Prometheus metrics on this port (0: off).")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="transformers (the model runs here), vllm (vLLM's server beside the worker, or the one at "
            "--upstream-url) or openai-http (forward to an OpenAI-compatible server)."
        ),
    ] = None,
    upstream_url: Annotated[
        str | None,
        typer.Option(help="openai-http, vllm: base URL of a running server, e.g. http://vllm:8000/v1."),
    ] = None,
    upstream_model: Annotated[
        str | None, typer.Option(help="openai-http, vllm: the upstream's model name.")
    ] = None,
    settings_from_stdin: FromStdinOpt = False,
) -> None:
    """Run one GPU worker: one model on one device, continuous batching."""
    # Before torch (and its OpenMP runtime, libgomp) loads: its threads spin 200,000 times while they
    # wait for each other, the fastest on free cores, and the worker runs only as many as the cores other
    # processes leave free (worker/cpu_threads.py), which keeps spinning safe where they share them.
    # A user's setting wins.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        from worker.cpu_threads import SPINCOUNT

        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    if settings_from_stdin:
        _settings_from_stdin("worker.main", "transformers.models.auto.modeling_auto")
    from worker.main import run

    settings = get_settings()
    _worker_model(settings, model, served_name)
    if device:
        settings.model.device = device
    if max_batch:
        settings.model.max_batch = max_batch
    if metrics_port is not None:
        settings.worker.metrics_port = metrics_port
    if engine is not None:
        if engine not in ENGINES:
            raise typer.BadParameter(f"must be one of {', '.join(ENGINES)}", param_hint="--engine")
        settings.worker.engine = engine  # type: ignore[assignment]
    if upstream_url is not None:
        settings.worker.upstream_url = upstream_url
    if upstream_model is not None:
        settings.worker.upstream_model = upstream_model
    if settings.worker.engine == "openai-http" and not settings.worker.upstream_url:
        raise typer.BadParameter("openai-http needs --upstream-url", param_hint="--upstream-url")
    _require_servers(settings)
    if settings.worker.engine == "transformers" or (
        settings.worker.engine == "vllm" and not settings.worker.upstream_url
    ):
        _require_model(settings)
    _logging(settings)
    run(settings)


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    from shared.db import upgrade

    _, database_url = _require_servers(get_settings())
    upgrade(database_url)
    console.print("[green]database schema is up to date[/]")


@model_app.command("fetch")
def model_fetch(
    embeddings: Annotated[
        bool,
        typer.Option("--embeddings", help="Also fetch the demo embedding model (all-MiniLM-L6-v2)."),
    ] = False,
) -> None:
    """Download the demo model and convert it once into a fast-loading transformers directory."""
    from pathlib import Path

    from worker.model import fetch_demo_model, fetch_embedding_model

    settings = get_settings()

    def progress(message: str) -> None:
        console.print(f"[dim]{escape(message)}[/]")

    target = fetch_demo_model(Path(settings.model_path), progress=progress)
    console.print(f"[green]{escape(str(target))}[/]")
    if embeddings:
        target = fetch_embedding_model(Path(settings.embedding_model_path), progress=progress)
        console.print(f"[green]{escape(str(target))}[/]")


def _fail(resp: httpx.Response) -> None:
    fail(resp, console)


@app.command()
def submit(
    text: Annotated[str, typer.Argument(help="The user message.")],
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they arrive.")] = False,
    max_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 0.0,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """Submit a chat job; print its answer (streamed with --stream)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    with httpx.Client(
        base_url=url, headers=auth_headers(api_key), timeout=httpx.Timeout(10, read=None)
    ) as client:
        resp = client.post("/v1/jobs", json=body)
        if resp.status_code != 202:
            _fail(resp)
        job_id = resp.json()["id"]
        if stream:
            _print_stream(client, job_id)
        else:
            job = _wait(client, job_id)
            console.print(job.get("output") or "", markup=False)
        console.print(f"[dim]{job_id}[/]")


def _print_stream(client: httpx.Client, job_id: str) -> None:
    event = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event:
                data = json.loads(line.split(":", 1)[1])
                if event == "token":
                    sys.stdout.write(data["text"])
                    sys.stdout.flush()
                elif event in ("done", "error"):
                    sys.stdout.write("\n")
                    if event == "error":
                        console.print(f"[red]{data['type']}: {data['message']}[/]")
                    return


def _wait(client: httpx.Client, job_id: str) -> dict[str, Any]:
    # The API answers when the job ends (or after a minute, and then we ask again): no polling.
    while True:
        resp = client.get(f"/v1/jobs/{job_id}", headers={PREFER: "wait=60"})
        if resp.status_code != 200:
            _fail(resp)
        job: dict[str, Any] = resp.json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, cancelled")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """List recent jobs, newest first."""
    params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
    resp = httpx.get(f"{url}/v1/jobs", params=params, headers=auth_headers(api_key), timeout=10)
    if resp.status_code != 200:
        _fail(resp)
    jobs = resp.json()["data"]
    rows = []
    for j in jobs:
        usage = j.get("usage") or {}
        ttft = j["timings"].get("ttft_ms")
        rows.append(
            (
                j["id"],
                j["status"],
                j["created_at"][5:16].replace("T", " "),
                str(usage.get("completion_tokens", "")),
                f"{ttft:.0f}" if ttft else "",
                (j.get("output") or "")[:200].replace("\n", " "),
            )
        )
    # The id is what a user copies: never cut or wrapped. Every column but the output keeps its whole
    # width; the output gets what is left, cut with an ellipsis. Without that bound, rich shrinks all
    # columns alike for a long output, and the narrow ones (status, tokens, ttft) vanish.
    fixed = (("id", 2), ("status", 9), ("created UTC", 11), ("tokens", 6), ("ttft ms", 7))
    widths = [max(len(name), least, *(len(r[i]) for r in rows)) for i, (name, least) in enumerate(fixed)]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for (name, _), width in zip(fixed, widths, strict=True):
        right = name in ("tokens", "ttft ms")
        table.add_column(name, justify="right" if right else "left", no_wrap=True, min_width=width)
    left = console.width - sum(w + 2 for w in widths)  # each with a space of padding and the rule's space
    table.add_column("output", no_wrap=True, overflow="ellipsis", min_width=6, max_width=max(6, left))
    for row in rows:
        table.add_row(*row)
    console.print(table)


TENANT_VIEW_NOTE = (
    "tenant view: only your own running jobs are listed; an admin key sees every job, host and pid"
)


@app.command()
def workers(
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw registry entries.")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """List live workers: device, model, load and throughput."""
    resp = httpx.get(f"{url}/v1/workers", headers=auth_headers(api_key), timeout=10)
    if resp.status_code != 200:
        _fail(resp)
    data = resp.json()["data"]
    if as_json:
        console.print_json(json.dumps(data))
        return
    if resp.json().get("view") == "tenant":
        console.print(f"[dim]{TENANT_VIEW_NOTE}[/dim]")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for name, width in (("id", 0), ("model", 0), ("device", 6), ("running", 7), ("tokens/s", 8)):
        # Ids and model names are what a user copies: shown whole.
        longest = max((len(str(w.get(name, ""))) for w in data), default=0)
        table.add_column(name, no_wrap=True, min_width=max(width, longest if width == 0 else 0))
    table.add_column("state", no_wrap=True, min_width=8)
    table.add_column("up", no_wrap=True, min_width=9)
    now = time.time()
    for w in data:
        up_s = int(now - w["started_at"])
        table.add_row(
            w["id"],
            w["model"],
            w["device"],
            f"{w['running']}/{w['capacity']}",
            f"{w['tokens_per_s']:.1f}",
            "draining" if w["draining"] else "serving",
            f"{up_s // 3600}h{up_s % 3600 // 60:02d}m{up_s % 60:02d}s",
        )
    console.print(table if data else "no live workers")


app.command("batch")(batch_cli.batch)


def _bad_settings(exc: ValidationError) -> None:
    """A setting that does not validate, as one line per variable (not pydantic's traceback); exit 2."""
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        # INFERQ_<FIELD>, or INFERQ_<GROUP>__<FIELD> for a field of a group (model, worker, ...)
        field = Settings.model_fields.get(loc[0]) if loc else None
        kind = field.annotation if field is not None else None
        group = isinstance(kind, type) and issubclass(kind, BaseModel) and len(loc) > 1
        name = "INFERQ_" + "__".join(loc[:2] if group else loc[:1]).upper()
        message = error["msg"].removeprefix("Value error, ")
        err.print(f"[red]error:[/] {name}: {escape(message)}", soft_wrap=True)
    raise SystemExit(2)


def main() -> None:
    try:
        app()
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        _bad_settings(exc)
    except SettingsError as exc:  # a value pydantic-settings could not parse (a group's JSON)
        field = re.search(r'field "(\w+)"', str(exc))
        what = f"INFERQ_{field.group(1).upper()}: not valid JSON" if field else str(exc)
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        err.print(f"[red]error:[/] {escape(what + cause)}", soft_wrap=True)
        raise SystemExit(2) from None
    except httpx.ConnectError as exc:
        url = exc.request.url if exc._request is not None else "the API"
        console.print(f"[red]cannot reach inferq at {url}:[/] {exc}. Is it running (`inferq up`)? Use --url.")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
