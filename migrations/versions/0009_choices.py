"""choices: jobs.choices, every output of a job that asked for n > 1 (jobs.output stays the first's)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("choices", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "choices")
