"""Tenants: API keys, authentication, limits, rate limits and idempotency keys."""
