"""HTTP header names that clients, the API and the tests share."""

from __future__ import annotations

# The job behind an OpenAI-shaped answer (chat, completions, responses): GET /v1/jobs/{id} shows it.
JOB_ID = "x-inferq-job-id"
PREFER = "Prefer"  # RFC 7240; inferq honours `wait=N`
PREFERENCE_APPLIED = "Preference-Applied"
RETRY_AFTER = "Retry-After"
# A deadline for the job from submission (as at Replicate): "30s", "5m", "1h30m", or seconds.
CANCEL_AFTER = "Cancel-After"
# Standard Webhooks (https://www.standardwebhooks.com): the same id on every retry of one delivery.
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
