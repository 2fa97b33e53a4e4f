"""files and batches; jobs learn which batch line they run

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_files_created", "files", ["created_at", "id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(40), sa.ForeignKey("files.id"), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("rejected", postgresql.JSONB(), nullable=True),
        sa.Column("fed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("errors", postgresql.JSONB(), nullable=True),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        *(
            sa.Column(name, _TS, nullable=True)
            for name in (
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        ),
        sa.CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', "
            "'cancelling', 'cancelled')",
            name="ck_batches_status",
        ),
    )
    op.create_index("ix_batches_created", "batches", ["created_at", "id"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.add_column("jobs", sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id"), nullable=True))
    op.add_column("jobs", sa.Column("batch_line", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("custom_id", sa.String(512), nullable=True))
    op.create_index("ix_jobs_batch_line", "jobs", ["batch_id", "batch_line"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_line", table_name="jobs")
    op.drop_column("jobs", "custom_id")
    op.drop_column("jobs", "batch_line")
    op.drop_column("jobs", "batch_id")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_created", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_files_created", table_name="files")
    op.drop_table("files")
