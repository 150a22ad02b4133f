"""Text generation requests against a job's checkpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, Select, String, Text, func, select
from sqlalchemy.orm import Mapped, aliased, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, new_id, utcnow

SAMPLE_STATUSES = ("queued", "running", "succeeded", "failed")
PENDING_SAMPLE_STATUSES = ("queued", "running")


class Sample(db.Model):
    """One prompt; the worker fills text (or error) and finished_at."""

    __tablename__ = "samples"
    __table_args__ = (
        Index("ix_samples_job_id", "job_id"),
        # the per-key cap counts a key's pending samples; the fair pick reads each key's last start
        Index("ix_samples_owner_status", "owner_id", "status"),
        Index("ix_samples_owner_started", "owner_id", "started_at"),
        Index("ix_samples_status_created", "status", "created_at"),
    )

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


def next_fair_sample() -> Select[tuple[str]]:
    """The id of the queued sample to run next: round-robin over API keys.

    The key whose last sample started longest ago (a key never served first) goes next, with its
    oldest queued sample; so one key's backlog delays another key's sample by at most one turn per
    sample worker, whatever the order the requests (and their broker messages) came in."""
    other = aliased(Sample)
    last_start = select(func.max(other.started_at)).where(other.owner_id == Sample.owner_id).scalar_subquery()
    return (select(Sample.id).where(Sample.status == "queued")
            .order_by(last_start.asc().nulls_first(), Sample.created_at, Sample.id).limit(1))
