"""embeddings: jobs.embedding, an embeddings job's vectors as float32 bytes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# Expand only: a nullable column that older code never reads or writes.
compatible_with_code_from: str = "0009"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("embedding", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "embedding")
