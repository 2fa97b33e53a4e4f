"""Standard Webhooks signatures (the `standardwebhooks` reference library): `whsec_` secrets, and
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per live secret, space-separated while a
rotated-out secret is still honoured."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

from shared.webhooks import SECRET_PREFIX


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def hint(secret: str) -> str:
    """What a listing shows of a secret: enough to tell two apart, nothing to sign with."""
    return f"{secret[:10]}…{secret[-4:]}"


def live_secrets(secret: str, previous: str | None, previous_expires_at: datetime | None) -> list[str]:
    if previous and previous_expires_at is not None and previous_expires_at > datetime.now(UTC):
        return [secret, previous]
    return [secret]


def signature(delivery_id: str, timestamp: datetime, body: str, keys: list[str]) -> str:
    return " ".join(Webhook(key).sign(delivery_id, timestamp, body) for key in keys)
