"""The worker's Prometheus metrics (vLLM's names, `inferq:` prefix), served on `--metrics-port`.

Each worker exposes its own: Prometheus scrapes every worker (and the API for the fleet and queue
figures), as it does vLLM's servers. Buckets are sized for LLM latencies, from milliseconds (a token
on a GPU) to minutes (a long generation on a CPU).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from pydantic import SecretStr

from shared.metrics_auth import METRICS_TOKEN_CODE, METRICS_TOKEN_REQUIRED, authorized

log = logging.getLogger(__name__)

_TTFT = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
_QUEUE = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

LABELS = ("model_name",)

queue_time = Histogram(
    "inferq:request_queue_time_seconds", "From job creation to a worker starting it.", LABELS, buckets=_QUEUE
)
ttft = Histogram(
    "inferq:time_to_first_token_seconds",
    "From job creation to its first generated token.",
    LABELS,
    buckets=_TTFT,
)
itl = Histogram(
    "inferq:inter_token_latency_seconds", "Time between two generated tokens of a job.", LABELS, buckets=_ITL
)
e2e = Histogram("inferq:e2e_request_latency_seconds", "From job creation to its end.", LABELS, buckets=_E2E)
prompt_tokens = Counter("inferq:prompt_tokens", "Prompt tokens of the jobs run.", LABELS)
generation_tokens = Counter("inferq:generation_tokens", "Tokens generated.", LABELS)
success = Counter(
    "inferq:request_success", "Jobs that ended, by finish reason.", (*LABELS, "finished_reason")
)
failures = Counter("inferq:request_failure", "Jobs that failed, by error type.", (*LABELS, "error_type"))
running = Gauge("inferq:engine_requests_running", "Jobs this worker holds.", LABELS)
cpu_threads = Gauge(
    "inferq:engine_cpu_threads",
    "torch threads a CPU worker runs now: one per core other processes leave free (worker/cpu_threads.py).",
    LABELS,
)
batch_size = Histogram(
    "inferq:engine_batch_size",
    "Requests that shared an engine step (one sample per step).",
    LABELS,
    buckets=_BATCH,
)


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _guarded(app: _WsgiApp, token: SecretStr | None) -> _WsgiApp:
    """`app`, answering 401 with the API's error envelope to a request without the metrics token."""
    if token is None:
        return app
    body = json.dumps(
        {
            "error": {
                "message": METRICS_TOKEN_REQUIRED,
                "type": "authentication_error",
                "param": None,
                "code": METRICS_TOKEN_CODE,
            }
        }
    ).encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if authorized(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", "Bearer"),
            ],
        )
        return [body]

    return guarded


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each (prometheus_client's own server is as quiet)."""


def serve(port: int, host: str = "0.0.0.0", token: SecretStr | None = None) -> WSGIServer | None:
    """prometheus_client's own server (a daemon thread per request), with the metrics token in front;
    None when `port` is 0 (off)."""
    if not port:
        return None
    # An IPv6 address needs its family set before binding, as prometheus_client's start_http_server does.
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class: type[WSGIServer] = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = make_server(host, port, _guarded(make_wsgi_app(REGISTRY), token), server_class, _Quiet)
    threading.Thread(target=server.serve_forever, name="inferq-metrics", daemon=True).start()
    log.info("metrics on %s:%d/metrics%s", host, port, " (token required)" if token else "")
    return server


def public_url(port: int, host: str, advertise: str | None) -> str | None:
    """Where Prometheus (or a person) reaches this worker's /metrics; None when it serves none."""
    if not port:
        return None
    name = advertise or (host if host not in ("", "0.0.0.0", "::") else socket.gethostname())
    if ":" in name:
        name = f"[{name}]"
    return f"http://{name}:{port}/metrics"
