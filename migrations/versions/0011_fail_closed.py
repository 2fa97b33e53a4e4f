"""fail closed: api_keys.admin, and auth_state, which remembers that keys ever existed

Once a key has existed, `INFERQ_AUTH=auto` keeps requiring keys, even when every key is revoked or
deleted: a trigger on api_keys records the first key, whoever inserts it (the CLI, a script, psql).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# Expand only: a column with a server default and a table that code at 0009 never reads (that code
# still decides auth by counting active keys).
compatible_with_code_from: str = "0009"


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "auth_state",
        sa.Column("id", sa.SmallInteger(), primary_key=True),
        sa.Column("keys_since", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("id = 1", name="auth_state_single_row"),
    )
    op.execute(
        """
        CREATE FUNCTION inferq_keys_exist() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO auth_state (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER api_keys_exist AFTER INSERT ON api_keys "
        "FOR EACH STATEMENT EXECUTE FUNCTION inferq_keys_exist()"
    )
    # A database that already has keys (revoked ones too) has had them.
    op.execute(
        "INSERT INTO auth_state (id, keys_since) SELECT 1, min(created_at) FROM api_keys HAVING count(*) > 0"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_exist ON api_keys")
    op.execute("DROP FUNCTION inferq_keys_exist()")
    op.drop_table("auth_state")
    op.drop_column("api_keys", "admin")
