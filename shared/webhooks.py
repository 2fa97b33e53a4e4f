"""Webhook wire names: the event types a tenant's endpoints subscribe to, the filter names of a job's
own webhook, and id prefixes. The outbox triggers (migrations/versions/0005_webhooks.py) write the
same names."""

from __future__ import annotations

from typing import Final, Literal

JOB_EVENTS_FILTER = ("start", "completed")  # a job's own `webhook_events_filter` values
JobWebhookEvent = Literal["start", "completed"]
DEFAULT_JOB_FILTER: Final = ["completed"]

JOB_COMPLETED: Final = "job.completed"
BATCH_EVENTS: Final = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
RESPONSE_EVENTS: Final = (
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.cancelled",
)
ENDPOINT_EVENT_TYPES: Final = frozenset({JOB_COMPLETED, *BATCH_EVENTS, *RESPONSE_EVENTS})

SECRET_PREFIX: Final = "whsec_"
EVENT_PREFIX: Final = "evt_"  # an OpenAI-shape payload's id: evt_ + the delivery's hex
