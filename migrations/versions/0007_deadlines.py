"""deadlines: jobs.cancel_at (Cancel-After), jobs.timeout_seconds (running time), jobs.deadline_at (the
earlier of the two, fixed at the first start) and the `expired` state (its deadline passed before it
ever started); the webhook trigger treats `expired` as final (a response's event: response.cancelled)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
_STATUSES = "'queued', 'running', 'succeeded', 'failed', 'cancelled'"

# Literals, not imports: a migration says what it did on the day it was written.
_JOB_TRIGGER = """
CREATE OR REPLACE FUNCTION inferq_job_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_final boolean := NEW.status IN ('succeeded', 'failed', 'cancelled', 'expired');
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
                WHEN NEW.status = 'expired' THEN 'cancelled'
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
_JOB_TRIGGER_BEFORE = """
CREATE OR REPLACE FUNCTION inferq_job_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
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


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cancel_at", _TS, nullable=True))
    op.add_column("jobs", sa.Column("timeout_seconds", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("deadline_at", _TS, nullable=True))
    # The deadline duty's scan: queued jobs whose deadline has passed.
    op.create_index(
        "ix_jobs_deadline", "jobs", ["deadline_at"], postgresql_where=sa.text("status = 'queued'")
    )
    op.drop_constraint("ck_jobs_status", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_status", "jobs", f"status IN ({_STATUSES}, 'expired')")
    op.execute(_JOB_TRIGGER)


def downgrade() -> None:
    op.execute(_JOB_TRIGGER_BEFORE)
    op.execute("UPDATE jobs SET status = 'cancelled' WHERE status = 'expired'")
    op.drop_constraint("ck_jobs_status", "jobs", type_="check")
    op.create_check_constraint("ck_jobs_status", "jobs", f"status IN ({_STATUSES})")
    op.drop_index("ix_jobs_deadline", table_name="jobs")
    op.drop_column("jobs", "deadline_at")
    op.drop_column("jobs", "timeout_seconds")
    op.drop_column("jobs", "cancel_at")
