"""webhooks: tenants' endpoints and signing secrets, and the outbox of deliveries that triggers on jobs
and batches fill in the same transaction as the state change (so no result goes without its webhook,
and no webhook goes out for a result that was not written)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)

# Literals, not imports: a migration says what it did on the day it was written. A job's own webhook
# (`request.webhook`, filtered by `request.webhook_events_filter`, default ["completed"]) gets `start`
# (its first start) and `completed`; a tenant's endpoints get `job.completed` (jobs outside batches),
# `response.<status>` and `batch.<status>` when they subscribed to them.
_JOB_TRIGGER = """
CREATE FUNCTION inferq_job_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_final boolean := NEW.status IN ('succeeded', 'failed', 'cancelled');
    v_tenant text := coalesce(NEW.tenant, 'default');
    v_filter jsonb;
    v_kind text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;
    IF NEW.request ? 'webhook' THEN
        v_filter := coalesce(NEW.request -> 'webhook_events_filter', '["completed"]'::jsonb);
        IF NEW.status = 'running' AND NEW.attempts = 1 AND v_filter ? 'start' THEN
            INSERT INTO webhook_deliveries (id, tenant, url, event_type, subject_id)
            VALUES (inferq_delivery_id(), v_tenant, NEW.request ->> 'webhook', 'start', NEW.id);
        ELSIF v_final AND v_filter ? 'completed' THEN
            INSERT INTO webhook_deliveries (id, tenant, url, event_type, subject_id)
            VALUES (inferq_delivery_id(), v_tenant, NEW.request ->> 'webhook', 'completed', NEW.id);
        END IF;
    END IF;
    IF v_final AND NEW.batch_id IS NULL THEN
        IF NEW.request ->> 'endpoint' = '/v1/responses' THEN
            v_kind := 'response.' || CASE
                WHEN NEW.status = 'succeeded' AND NEW.finish_reason = 'length' THEN 'incomplete'
                WHEN NEW.status = 'succeeded' THEN 'completed'
                ELSE NEW.status
            END;
        END IF;
        INSERT INTO webhook_deliveries (id, tenant, endpoint_id, event_type, subject_id)
        SELECT inferq_delivery_id(), e.tenant, e.id, t.kind, NEW.id
        FROM webhook_endpoints e, (VALUES ('job.completed'), (v_kind)) AS t (kind)
        WHERE t.kind IS NOT NULL AND e.tenant = v_tenant AND e.disabled_at IS NULL AND e.event_types ? t.kind;
    END IF;
    RETURN NEW;
END $$
"""
_JOB_TRIGGER_ON = """
CREATE TRIGGER jobs_webhooks AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION inferq_job_webhooks()
"""
_BATCH_TRIGGER = """
CREATE FUNCTION inferq_batch_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS NOT DISTINCT FROM OLD.status
        OR NEW.status NOT IN ('completed', 'failed', 'expired', 'cancelled') THEN
        RETURN NEW;
    END IF;
    INSERT INTO webhook_deliveries (id, tenant, endpoint_id, event_type, subject_id)
    SELECT inferq_delivery_id(), e.tenant, e.id, 'batch.' || NEW.status, NEW.id
    FROM webhook_endpoints e
    WHERE e.tenant = coalesce(NEW.tenant, 'default') AND e.disabled_at IS NULL
        AND e.event_types ? ('batch.' || NEW.status);
    RETURN NEW;
END $$
"""
_BATCH_TRIGGER_ON = """
CREATE TRIGGER batches_webhooks AFTER UPDATE OF status ON batches
    FOR EACH ROW EXECUTE FUNCTION inferq_batch_webhooks()
"""
_DELIVERY_ID = """
CREATE FUNCTION inferq_delivery_id() RETURNS text LANGUAGE sql VOLATILE AS
$$ SELECT 'msg_' || replace(gen_random_uuid()::text, '-', '') $$
"""


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", postgresql.JSONB(), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_expires_at", _TS, nullable=True),
        sa.Column("disabled_at", _TS, nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _TS, nullable=True),
    )
    op.create_index("ix_webhook_endpoints_tenant", "webhook_endpoints", ["tenant"])
    op.create_table(
        "webhook_secrets",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_expires_at", _TS, nullable=True),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column(
            "endpoint_id",
            sa.String(40),
            sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", _TS, server_default=sa.func.now(), nullable=False),
        sa.Column("last_attempt_at", _TS, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, server_default=sa.func.now(), nullable=False),
        sa.Column("delivered_at", _TS, nullable=True),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_webhook_deliveries_endpoint", "webhook_deliveries", ["endpoint_id", "created_at"])
    op.create_index("ix_webhook_deliveries_subject", "webhook_deliveries", ["subject_id"])
    # One statement per call: the asyncpg driver prepares each.
    for statement in (_DELIVERY_ID, _JOB_TRIGGER, _JOB_TRIGGER_ON, _BATCH_TRIGGER, _BATCH_TRIGGER_ON):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS batches_webhooks ON batches")
    op.execute("DROP TRIGGER IF EXISTS jobs_webhooks ON jobs")
    op.execute("DROP FUNCTION IF EXISTS inferq_batch_webhooks()")
    op.execute("DROP FUNCTION IF EXISTS inferq_job_webhooks()")
    op.execute("DROP FUNCTION IF EXISTS inferq_delivery_id()")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_table("webhook_endpoints")
