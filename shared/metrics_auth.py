"""The optional bearer token of every `/metrics`, the API's and each worker's (INFERQ_METRICS_TOKEN)."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

METRICS_TOKEN_REQUIRED = (
    "this /metrics needs the metrics token: send 'Authorization: Bearer <INFERQ_METRICS_TOKEN>'"
)
METRICS_TOKEN_CODE = "invalid_metrics_token"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def authorized(authorization: str | None, token: SecretStr | None) -> bool:
    """Whether a request with this Authorization header may read /metrics: always when no token is set."""
    if token is None:
        return True
    scheme, _, given = (authorization or "").strip().partition(" ")
    # Digests of equal length, compared in constant time: the time taken tells nothing of the token,
    # not even its length.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        _digest(given.strip()), _digest(token.get_secret_value())
    )
