"""schema compatibility: inferq_schema, the oldest code revision that may run on the current schema, so
that code one revision behind starts during a rolling deploy (docs/migrations.md)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# Expand only: a new table that code at 0009 never reads.
compatible_with_code_from: str = "0009"


def upgrade() -> None:
    op.create_table(
        "inferq_schema",
        sa.Column("singleton", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.String(length=32), nullable=False),
        sa.Column("compatible_with_code_from", sa.String(length=32), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("singleton", name="ck_inferq_schema_singleton"),
        sa.PrimaryKeyConstraint("singleton"),
    )


def downgrade() -> None:
    op.drop_table("inferq_schema")
