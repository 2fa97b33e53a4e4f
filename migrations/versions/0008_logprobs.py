"""logprobs: jobs.logprobs, the per-token log-probabilities of a job that asked for them

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("logprobs", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "logprobs")
