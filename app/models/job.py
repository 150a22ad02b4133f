"""Training jobs: the single source of truth for a job's state."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, new_id, utcnow

JOB_STATUSES = ("queued", "running", "pausing", "paused", "cancelling", "succeeded", "failed", "cancelled")
# Counted toward a key's live-job limit: they hold, or wait for, a worker. A paused job holds neither.
LIVE_STATUSES = ("queued", "running", "pausing", "cancelling")
# Not finished: a paused job still needs its dataset and cannot be retried.
UNFINISHED_STATUSES = (*LIVE_STATUSES, "paused")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
HEALTH_STATES = ("ok", "warning", "critical")


class Job(db.Model):
    """One training run of a spec on a dataset."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner_id", "created_at", "id"),
        Index("ix_jobs_status_enqueued", "status", "enqueued_at"),
        Index("ix_jobs_dataset_id", "dataset_id"),
        Index("ix_jobs_parent_id", "parent_id"),
        # the fair pick reads each key's last claim
        Index("ix_jobs_owner_claimed", "owner_id", "claimed_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    owner_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    dataset_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("datasets.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # sha256 of the canonical body that first used the key: a replay with another body is refused
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    step: Mapped[int] = mapped_column(Integer, default=0)
    max_steps: Mapped[int] = mapped_column(Integer)
    tokens_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    latest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    health: Mapped[str] = mapped_column(String(16), default="ok")
    error: Mapped[str | None] = mapped_column(Text)
    diagnosis: Mapped[Any | None] = mapped_column(JSON)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A retry's lineage (migration 0005): the job it was made from, and the spec changes it applied
    # ([{field, value, from_finding}], from_finding null for an explicit override). No foreign key:
    # adding one to `jobs` on SQLite means rebuilding the table, and dropping the old one cascades
    # into every job's metrics. Parent and child always share an owner, so they are deleted together.
    parent_id: Mapped[str | None] = mapped_column(String(40))
    applied_patch: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # set at each claim; every worker write is conditional on it (a taken-over worker writes nothing)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    # the database's time of the last claim: the training queue serves the key served least recently
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Pause (migration 0010): when the job last became paused, and the seconds it spent paused after
    # its first start; the job time limit and the ETA count running time only, not paused time.
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    paused_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
