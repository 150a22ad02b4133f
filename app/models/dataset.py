"""Uploaded text corpora; files are content-addressed by sha256."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, new_id, utcnow


class Dataset(db.Model):
    """One upload; the file lives at <storage>/datasets/<sha256>.txt."""

    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_owner_created", "owner_id", "created_at", "id"),
        Index("ix_datasets_sha256", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    owner_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
