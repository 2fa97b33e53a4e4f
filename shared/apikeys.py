"""API keys: how they are made, stored (a SHA-256 hash, never the key) and checked (in constant time).

A key reads `iq_<id>_<secret>`: the id finds the stored hash in one indexed lookup, and the secret
(256 random bits) makes a fast hash safe, as for GitHub's and Stripe's tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "iq_"
# Owner of what is made while the API is open (no key exists yet, or INFERQ_AUTH=off); a key made with
# `inferq keys create --tenant default` reads it once keys are required.
DEFAULT_TENANT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str) -> str:
    return f"{PREFIX}{key_id.removeprefix('key_')}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id a well-formed key names; None for anything else."""
    if not key.startswith(PREFIX):
        return None
    ident, sep, secret = key[len(PREFIX) :].partition("_")
    if not sep or not secret or len(ident) != 12 or any(c not in "0123456789abcdef" for c in ident):
        return None
    return "key_" + ident


def matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)
