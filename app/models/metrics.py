"""Per-step and per-layer training metrics (written idempotently by the worker)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db


class StepMetric(db.Model):
    """One optimizer step; (job_id, step) is the primary key, so paging by step is one index range."""

    __tablename__ = "step_metrics"

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    grad_norm_clipped: Mapped[float | None] = mapped_column(Float)
    clipped: Mapped[bool] = mapped_column(Boolean, default=False)
    nonfinite: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    loss_scale: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    tokens_seen: Mapped[int | None] = mapped_column(BigInteger)
    val_loss: Mapped[float | None] = mapped_column(Float)
    time: Mapped[float | None] = mapped_column(Float)


class LayerMetric(db.Model):
    """One weight matrix at one step; (job_id, step, layer) is the primary key.

    `position` is the matrix's depth index (0 = nearest the input, as `model.layer_names()` lists them);
    null for rows written before it was recorded. The (job_id, step, position, layer) index is the API's
    read order, so a page is one index range scan with no sort."""

    __tablename__ = "layer_metrics"
    __table_args__ = (Index("ix_layer_metrics_job_step_position", "job_id", "step", "position", "layer"),)

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int | None] = mapped_column(Integer)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    weight_norm: Mapped[float | None] = mapped_column(Float)
    update_ratio: Mapped[float | None] = mapped_column(Float)
