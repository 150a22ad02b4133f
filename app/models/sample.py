"""Text generation requests against a job's checkpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, new_id, utcnow

SAMPLE_STATUSES = ("queued", "running", "succeeded", "failed")


class Sample(db.Model):
    """One prompt; the worker fills text (or error) and finished_at."""

    __tablename__ = "samples"
    __table_args__ = (Index("ix_samples_job_id", "job_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("smp"))
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    checkpoint_step: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    text: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # stamped before each publish: the reconciler re-sends only when this is missing or old
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # the timeout of a running sample counts from here, not from a long wait in the queue
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
