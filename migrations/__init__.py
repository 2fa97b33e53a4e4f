"""Alembic migrations for inferq's Postgres schema."""
