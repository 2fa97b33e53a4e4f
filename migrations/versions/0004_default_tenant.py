"""default tenant: jobs, batches and files made while the API was open belong to tenant `default`,
which a key made with `inferq keys create --tenant default` reads

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A literal, not shared.apikeys.DEFAULT_TENANT: a migration says what it did on the day it was written.
_DEFAULT = "default"


def upgrade() -> None:
    for table in ("jobs", "batches", "files"):
        op.execute(f"UPDATE {table} SET tenant = '{_DEFAULT}' WHERE tenant IS NULL")


def downgrade() -> None:
    # Rows made while open and rows of a real tenant named `default` are no longer told apart: both stay.
    pass
