"""Logging for every inferq process: readable text by default, JSON lines with INFERQ_LOG_FORMAT=json.

The ids of what a line is about (request, job, worker) come from context variables that the API's
request-id middleware and the worker's job runner set, so every line carries them without being
passed around. Log lines carry ids and durations, never prompts, outputs or keys.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
worker_id: ContextVar[str | None] = ContextVar("worker_id", default=None)

_CONTEXT = (("request_id", request_id), ("job_id", job_id), ("worker_id", worker_id))


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{n}={getattr(record, n)}" for n, _ in _CONTEXT if getattr(record, n, None))
        return f"{line} [{ids}]" if ids else line


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger", "message": "event"},
                timestamp=True,  # ISO 8601, UTC
            )
        )
    else:
        handler.setFormatter(_Text("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers go through the same handler.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Alembic announces each of its plugins at INFO whenever a process reads the migration scripts
    # (the API and every worker check the schema at start-up): noise, not news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
