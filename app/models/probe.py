"""LR range tests run against a job's spec and dataset, and the devices' measured throughput."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, new_id, utcnow

PROBE_STATUSES = ("queued", "running", "succeeded", "failed")
PENDING_PROBE_STATUSES = ("queued", "running")


class Probe(db.Model):
    """One LR range test of a job's spec; the worker fills result (or error) and finished_at.

    It reads the job's stored spec and dataset and writes nothing else of the job's."""

    __tablename__ = "probes"
    __table_args__ = (
        Index("ix_probes_job_id", "job_id"),
        Index("ix_probes_owner_status", "owner_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("prb"))
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DeviceCalibration(db.Model):
    """A training worker's measured throughput on its device class (one row per class, the latest)."""

    __tablename__ = "device_calibrations"

    # "cpu:<processor model>" or "cuda:<device name>"
    device_class: Mapped[str] = mapped_column(String(200), primary_key=True)
    flops_per_s: Mapped[float] = mapped_column(Float)
    # the reference run behind the figure: spec summary, steps, seconds
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    measured_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
