"""retention: jobs.data_removed_at, set when a job's prompt and output are removed (DELETE /v1/jobs/{id}
or the retention period); the row stays as a tombstone with its usage and timings

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("data_removed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_retention", "jobs", ["finished_at"], postgresql_where=sa.text("data_removed_at IS NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_retention", table_name="jobs")
    op.drop_column("jobs", "data_removed_at")
