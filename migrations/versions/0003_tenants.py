"""tenants: API keys, idempotency keys, and the tenant (and key, request id) of jobs, batches, files

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=True),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", postgresql.JSONB(), nullable=True),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
    )
    for table in ("jobs", "batches", "files"):
        op.add_column(table, sa.Column("tenant", sa.String(64), nullable=True))
        op.create_index(f"ix_{table}_tenant", table, ["tenant"])
    for table in ("jobs", "batches"):
        op.add_column(table, sa.Column("api_key_id", sa.String(40), nullable=True))
    op.add_column("jobs", sa.Column("request_id", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "request_id")
    for table in ("jobs", "batches"):
        op.drop_column(table, "api_key_id")
    for table in ("jobs", "batches", "files"):
        op.drop_index(f"ix_{table}_tenant", table_name=table)
        op.drop_column(table, "tenant")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
