"""Webhook wire names: the event types a tenant's endpoints subscribe to, the filter names of a job's
own webhook, and id prefixes. The outbox triggers (migrations/versions/0005_webhooks.py) write the
same names."""

from __future__ import annotations

from typing import Final, Literal

from sqlalchemy import TextClause, text

JOB_EVENTS_FILTER = ("start", "output", "completed")  # a job's own `webhook_events_filter` values
JobWebhookEvent = Literal["start", "output", "completed"]
DEFAULT_JOB_FILTER: Final = ["completed"]
# The job as it stands while it generates: throttled by its worker, tried once, never retried.
OUTPUT: Final = "output"


def queue_output_delivery() -> TextClause:
    """A job's next `output` delivery, unless one is still waiting to be sent (the receiver then gets
    the newer text with that one: it is rendered when sent). Params: job, tenant, url."""
    return text(
        "INSERT INTO webhook_deliveries (id, tenant, url, event_type, subject_id) "
        "SELECT inferq_delivery_id(), CAST(:tenant AS text), CAST(:url AS text), 'output', "
        "CAST(:job AS text) WHERE NOT EXISTS (SELECT 1 FROM webhook_deliveries "
        "WHERE subject_id = CAST(:job AS text) AND event_type = 'output' AND status = 'pending')"
    )


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
