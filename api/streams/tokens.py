"""Stream tokens: short-lived, job-scoped credentials that a native EventSource carries in its URL (it
cannot send an Authorization header), so that an API key never goes into a URL or a server's access log."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from api.http.errors import STREAM_TOKEN_EXPIRED, STREAM_TOKEN_INVALID, STREAM_TOKEN_OTHER_JOB, Unauthorized
from api.http.services import Services
from shared import keys

_VERSION = "v1"
# The HMAC key is derived from the secret, not the secret itself: the secret may serve other uses later.
_CONTEXT = b"inferq stream token v1"
_CODE = "invalid_stream_token"


@dataclass(frozen=True)
class StreamGrant:
    """What a valid token lets its bearer do: read one job's events, as that job's tenant, until then;
    `key_id` is the API key that minted it (None while the API was open), whose revocation ends it and
    whose request limit its reconnects count against."""

    job_id: str
    tenant: str | None
    expires_at: int
    key_id: str | None = None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def _secret(services: Services) -> bytes:
    configured = services.settings.stream_token_secret
    if configured is not None:
        return configured.get_secret_value().encode()
    # Every API replica must sign and check with the same key: the first to need one makes it, the
    # rest read it. Losing Redis makes a new one, which only ends tokens minted before (minutes-lived).
    stored = await services.redis.get(keys.STREAM_TOKEN_SECRET)
    if stored is None:
        await services.redis.set(keys.STREAM_TOKEN_SECRET, secrets.token_hex(32), nx=True)
        stored = await services.redis.get(keys.STREAM_TOKEN_SECRET)
    return bytes(stored) if isinstance(stored, bytes) else str(stored).encode()


def _mac(secret: bytes, payload: bytes) -> bytes:
    key = hmac.new(secret, _CONTEXT, hashlib.sha256).digest()
    return hmac.new(key, payload, hashlib.sha256).digest()


def sign(secret: bytes, job_id: str, tenant: str | None, expires_at: int, key_id: str | None = None) -> str:
    """The token itself: its claims, readable, and their HMAC."""
    claims = {"job": job_id, "tenant": tenant, "key": key_id, "exp": expires_at}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return f"{_VERSION}.{_b64(payload)}.{_b64(_mac(secret, payload))}"


async def mint(services: Services, job_id: str, tenant: str | None, key_id: str | None) -> tuple[str, int]:
    """A token for the events of `job_id` (owned by `tenant`), minted by `key_id`, and when it expires
    (Unix seconds)."""
    expires_at = int(time.time()) + services.settings.stream_token_seconds
    return sign(await _secret(services), job_id, tenant, expires_at, key_id), expires_at


async def verify(services: Services, token: str, job_id: str) -> StreamGrant:
    """The grant of a token presented for `job_id`'s events; Unauthorized if it is forged, altered,
    expired or for another job."""
    version, _, rest = token.partition(".")
    encoded, _, signature = rest.partition(".")
    try:
        payload, mac = _unb64(encoded), _unb64(signature)
    except (binascii.Error, ValueError):
        raise Unauthorized(STREAM_TOKEN_INVALID, code=_CODE) from None
    if version != _VERSION or not hmac.compare_digest(mac, _mac(await _secret(services), payload)):
        raise Unauthorized(STREAM_TOKEN_INVALID, code=_CODE)
    claims = json.loads(payload)  # signed by us: well-formed
    if claims["job"] != job_id:
        raise Unauthorized(STREAM_TOKEN_OTHER_JOB, code=_CODE)
    if claims["exp"] <= time.time():
        raise Unauthorized(STREAM_TOKEN_EXPIRED.format(job_id=job_id), code=_CODE)
    return StreamGrant(claims["job"], claims["tenant"], int(claims["exp"]), claims.get("key"))
