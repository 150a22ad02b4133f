"""Per-step and per-layer training metrics (written idempotently by the worker)."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String
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


class ActivationMetric(db.Model):
    """Statistics of one activation site (a module's output) at one step; (job_id, step, site) is the
    primary key, so a re-sent flush overwrites instead of duplicating.

    `position` is the site's depth index (its index in the engine's list: input first, output head last).
    Which columns are set depends on `kind`: saturated_frac for tanh/sigmoid (and vanilla tanh-RNN outputs),
    dead_frac for the ReLU family, attn_* for attention, z_lse for the output, grad_time and grad_time_ratio
    for recurrent layers (gradient norm through time, [[t, norm], ...], and norm(t=0) / norm(t=T-1)).
    Non-finite values are stored as null. The (job_id, step, position, site) index is the API's read order."""

    __tablename__ = "activation_metrics"
    __table_args__ = (Index("ix_activation_metrics_job_step_position", "job_id", "step", "position", "site"),)

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    mean: Mapped[float | None] = mapped_column(Float)
    std: Mapped[float | None] = mapped_column(Float)
    saturated_frac: Mapped[float | None] = mapped_column(Float)
    dead_frac: Mapped[float | None] = mapped_column(Float)
    attn_max_logit: Mapped[float | None] = mapped_column(Float)
    attn_entropy: Mapped[float | None] = mapped_column(Float)
    z_lse: Mapped[float | None] = mapped_column(Float)
    grad_time: Mapped[list[list[float]] | None] = mapped_column(JSON)
    grad_time_ratio: Mapped[float | None] = mapped_column(Float)
