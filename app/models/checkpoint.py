"""Checkpoint records; files live at <storage>/checkpoints/<job_id>/step_<step>.pt."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, utcnow


class Checkpoint(db.Model):
    """A fully written checkpoint file of one job at one step."""

    __tablename__ = "checkpoints"

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    val_loss: Mapped[float | None] = mapped_column(Float)
    health: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
