"""Webhooks: tenants' endpoints, the signing secrets, the SSRF guard and the outbox dispatcher."""
