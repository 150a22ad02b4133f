"""Uploaded text corpora; files are content-addressed by sha256."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
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


class DatasetFile(db.Model):
    """One stored file, shared by every Dataset row with its sha256: `refs` counts those rows.

    Uploads and deletes of a content hash update this row first, which holds its lock (a row lock on
    PostgreSQL, the write lock on SQLite) until they commit: the file is placed, or removed at
    refs == 0, by one request at a time, so a delete never removes a file another row points at."""

    __tablename__ = "dataset_files"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    refs: Mapped[int] = mapped_column(Integer, default=0)
