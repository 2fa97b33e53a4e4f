"""SQLAlchemy 2 models: Postgres is the source of truth for every job and its result."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.states import BatchStatus, JobStatus


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class Base(DeclarativeBase):
    pass


_STATUSES = ", ".join(f"'{s.value}'" for s in JobStatus)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="ck_jobs_status"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_status_created", "status", "created_at", "id"),
        Index("ix_jobs_batch_line", "batch_id", "batch_line"),
        # The retention duty's scan: finished jobs whose content is still there, oldest first.
        Index("ix_jobs_retention", "finished_at", postgresql_where="data_removed_at IS NULL"),
        # The deadline duty's scan: queued jobs whose deadline has passed.
        Index("ix_jobs_deadline", "deadline_at", postgresql_where="status = 'queued'"),
    )
    __mapper_args__ = {"eager_defaults": True}  # created_at comes back from the INSERT

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_job_id)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    model: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB, nullable=True)

    output: Mapped[str | None] = mapped_column(Text)
    # For a job that asked for logprobs: shared.logprobs.TokenLogprob dicts, one per generated token.
    logprobs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB, nullable=True)
    # For a job with n > 1 outputs: each as {index, text, finish_reason, logprobs}; `output` is the first.
    choices: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB, nullable=True)
    # For an embeddings job: its vectors, float32 little-endian, one row per input (shared/embeddings.py).
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)

    queue_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    peak_batch_size: Mapped[int | None] = mapped_column(Integer)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set once the prompt, output and events are removed (DELETE, or the retention period).
    data_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Deadlines: Cancel-After (queue and run time), timeout_seconds (running time alone), and the one
    # that applies, the earlier of the two; the running-time part is fixed when the job first starts,
    # so a retried job keeps the deadline it had.
    cancel_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    timeout_seconds: Mapped[float | None] = mapped_column(Float)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # Set for the jobs of a batch: which batch, which input line, and the line's custom_id.
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    request_id: Mapped[str | None] = mapped_column(String(128))
    batch_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("batches.id"))
    batch_line: Mapped[int | None] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(512))


_BATCH_STATUSES = ", ".join(f"'{s.value}'" for s in BatchStatus)


class File(Base):
    """An uploaded batch input, or a batch's output or error file; the bytes live in the row."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_created", "created_at", "id"),)
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_file_id)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(f"status IN ({_BATCH_STATUSES})", name="ck_batches_status"),
        Index("ix_batches_created", "created_at", "id"),
        Index("ix_batches_status", "status"),
    )
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_batch_id)
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.VALIDATING.value)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40), ForeignKey("files.id"))
    completion_window: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB, nullable=True)
    model: Mapped[str | None] = mapped_column(String(200))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))

    total: Mapped[int] = mapped_column(Integer, default=0)
    # Lines refused at validation: they count as failed and go to the error file.
    rejected: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB, nullable=True)
    # Lines [0, fed) have been handed to the batch queue; the feeder moves it forward.
    fed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


class ApiKey(Base):
    """An API key: Postgres keeps only its SHA-256 hash; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_key_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64))
    rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # May see the whole fleet (every worker's jobs, hosts, pids); acts for its tenant like any key.
    admin: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)


class AuthState(Base):
    """One row once any API key has existed (a trigger on api_keys writes it): from then on `auto` auth
    requires keys, even with every key revoked. Nothing in inferq deletes it."""

    __tablename__ = "auth_state"
    __table_args__ = (CheckConstraint("id = 1", name="auth_state_single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    keys_since: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IdempotencyRecord(Base):
    """The first response to a request made with an Idempotency-Key, replayed for its retries."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)  # None while the first request runs
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(12)


def new_delivery_id() -> str:
    return "msg_" + secrets.token_hex(12)


class WebhookEndpoint(Base):
    """A tenant's receiver of events (`job.completed`, `batch.*`, `response.*`), OpenAI's shape."""

    __tablename__ = "webhook_endpoints"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_endpoint_id)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(JSONB)
    secret: Mapped[str] = mapped_column(String(128))
    # A rotated-out secret keeps signing (both signatures are sent) until previous_expires_at.
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookSecret(Base):
    """A tenant's signing secret for the webhooks named on its jobs (`webhook` on submit)."""

    __tablename__ = "webhook_secrets"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """The outbox: one row per event to send, written by a Postgres trigger in the same transaction as
    the state change that causes it (migrations/versions/0005_webhooks.py). Its id is the `webhook-id`
    of every try."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where="status = 'pending'"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "created_at"),
        Index("ix_webhook_deliveries_subject", "subject_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_delivery_id)
    tenant: Mapped[str] = mapped_column(String(64))
    endpoint_id: Mapped[str | None] = mapped_column(
        String(40), ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    url: Mapped[str | None] = mapped_column(Text)  # a job's own webhook; an endpoint's URL is read at sending
    event_type: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str] = mapped_column(String(40))  # the job or batch
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    body: Mapped[str | None] = mapped_column(Text)  # rendered at the first try, sent alike on every retry
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SchemaCompatibility(Base):
    """One row: the oldest code revision that may run on the schema at `revision` (written by every
    migration run, migrations/env.py). Code older than the schema cannot read the new migration's file,
    so it learns here whether it may start (shared/db.py, check_schema; docs/migrations.md). Later
    migrations only ever add to this table: code from 0010 on reads it."""

    __tablename__ = "inferq_schema"
    __table_args__ = (CheckConstraint("singleton", name="ck_inferq_schema_singleton"),)

    singleton: Mapped[bool] = mapped_column(primary_key=True, default=True)
    revision: Mapped[str] = mapped_column(String(32))
    compatible_with_code_from: Mapped[str] = mapped_column(String(32))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
