"""`inferq webhooks`: a tenant's webhook endpoints (create, list, delete, rotate their secret, see their
deliveries) and the signing secret of the webhooks named on its jobs, over the API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from inferq.batch_cli import ApiKeyOpt, auth_headers, fail

app = typer.Typer(help="Webhook endpoints and signing secrets.", no_args_is_help=True)
console = Console(highlight=False)
notes = Console(highlight=False, stderr=True)
UrlOpt = Annotated[str, typer.Option("--url", envvar="INFERQ_URL", help="Base URL of a running inferq API.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _call(method: str, url: str, path: str, api_key: str | None, **kwargs: Any) -> dict[str, Any]:
    resp = httpx.request(method, f"{url}{path}", headers=auth_headers(api_key), timeout=30, **kwargs)
    if resp.status_code >= 400:
        fail(resp, console)
    body: dict[str, Any] = resp.json()
    return body


def _secret_note(secret: str) -> None:
    print(secret)
    notes.print("[dim]keep it: it is shown only now[/]")


@app.command()
def create(
    target: Annotated[str, typer.Argument(metavar="URL", help="Where events are POSTed.")],
    events: Annotated[
        str, typer.Option("--events", help="Comma-separated, e.g. job.completed,batch.completed.")
    ] = "job.completed",
    name: Annotated[str | None, typer.Option(help="A name to tell endpoints apart.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Create an endpoint; prints its id, then its signing secret (shown once)."""
    body = {"url": target, "event_types": [e.strip() for e in events.split(",") if e.strip()], "name": name}
    made = _call("POST", url, "/v1/webhook_endpoints", api_key, json=body)
    print(made["id"])
    _secret_note(made["signing_secret"])


@app.command("list")
def list_(url: UrlOpt = DEFAULT_URL, api_key: ApiKeyOpt = None) -> None:
    """List the tenant's endpoints."""
    rows = _call("GET", url, "/v1/webhook_endpoints", api_key, params={"limit": 100})["data"]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("id", "status", "events", "url"):
        table.add_column(column, no_wrap=column in ("id", "status"), overflow="fold")
    for e in rows:
        table.add_row(e["id"], e["status"], ",".join(e["event_types"]), e["url"])
    console.print(table)


@app.command()
def delete(
    endpoint_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Delete an endpoint (its pending deliveries go with it)."""
    _call("DELETE", url, f"/v1/webhook_endpoints/{endpoint_id}", api_key)
    console.print(f"deleted {endpoint_id}")


@app.command()
def rotate(
    endpoint_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Give an endpoint a new secret (printed once); the old one keeps signing for a while."""
    _secret_note(
        _call("POST", url, f"/v1/webhook_endpoints/{endpoint_id}/rotate_secret", api_key)["signing_secret"]
    )


@app.command()
def deliveries(
    endpoint_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """An endpoint's recent deliveries: event, status, tries, last answer."""
    rows = _call(
        "GET", url, f"/v1/webhook_endpoints/{endpoint_id}/deliveries", api_key, params={"limit": 100}
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("webhook-id", "event", "status", "tries", "last"):
        table.add_column(column, no_wrap=True)
    for d in rows["data"]:
        last = str(d["last_status_code"] or d["last_error"] or "")
        table.add_row(d["id"], d["event_type"], d["status"], str(d["attempts"]), last[:40])
    console.print(table)


@app.command()
def secret(
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate", help="Replace it with a new one; the old one keeps signing too for a while."
        ),
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Print the secret that signs the webhooks named on this tenant's jobs (made the first time)."""
    if rotate:
        shown = _call("POST", url, "/v1/webhook_secret/rotate", api_key)
        print(shown["secret"])
        if shown["previous_valid_until"]:
            until = datetime.fromtimestamp(shown["previous_valid_until"], UTC).strftime("%Y-%m-%d %H:%M UTC")
            notes.print(f"[dim]new secret; deliveries carry a signature by the old one too until {until}[/]")
        return
    print(_call("POST", url, "/v1/webhook_secret", api_key)["secret"])
