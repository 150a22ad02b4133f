"""Metric series reads: one indexed range query, plain dicts, optional spike-keeping downsampling."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Select, select

from app.extensions import db
from app.models import LayerMetric, StepMetric

STEP_COLUMNS = ("step", "loss", "lr", "grad_norm", "grad_norm_clipped", "clipped", "nonfinite", "skipped",
                "loss_scale", "tokens_per_s", "tokens_seen", "val_loss", "time")
LAYER_COLUMNS = ("step", "layer", "position", "grad_norm", "weight_norm", "update_ratio")
# Core table columns: rows come back as plain tuples without the ORM loading layer
_STEP_SELECT = [StepMetric.__table__.c[c] for c in STEP_COLUMNS]
_LAYER_SELECT = [LayerMetric.__table__.c[c] for c in LAYER_COLUMNS]
_STEPS = StepMetric.__table__.c
_LAYERS = LayerMetric.__table__.c


def _to_dicts(rows: list[Any], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    # dict(zip()) runs in C; non-finite floats are nulled at serialization (see api.utils.json_response)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def _step_rows(job_id: str, after_step: int, limit: int) -> list[Any]:
    """Rows after `after_step`, trying a bounded step window first.

    Steps are dense, so (after_step, after_step + 2*limit] usually holds the whole page; the bound
    keeps the primary-key range scan small even when planner statistics are stale (PostgreSQL right
    after a bulk insert). Only a short page falls back to the open-ended query."""
    conn = db.session.connection()
    base = (select(*_STEP_SELECT).where(_STEPS.job_id == job_id, _STEPS.step > after_step)
            .order_by(_STEPS.step).limit(limit))
    rows = conn.execute(base.where(_STEPS.step <= after_step + 2 * limit)).all()
    if len(rows) < limit:
        rows = conn.execute(base).all()
    return rows


def step_page(job_id: str, after_step: int, limit: int, max_points: int | None) -> dict[str, Any]:
    """Rows with step > after_step (at most `limit`), downsampled to about max_points when given.

    `next_after_step` is the last step of this range when more rows may follow, else null.
    Non-finite floats are returned as null by the view; the row's `nonfinite` flag tells them apart.
    """
    rows = _to_dicts(_step_rows(job_id, after_step, limit), STEP_COLUMNS)
    next_after = rows[-1]["step"] if len(rows) == limit else None
    if max_points is not None and len(rows) > max_points:
        rows = downsample(rows, max_points)
    return {"items": rows, "next_after_step": next_after}


def _loss_key(row: dict[str, Any]) -> float:
    value = row["loss"]
    return value if value is not None else math.nan


def downsample(rows: list[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    """Bucket the steps evenly; per bucket keep the min-loss, max-loss and max-grad_norm rows and
    every nonfinite or skipped row, so spikes and NaNs always survive. Output is in step order;
    it can exceed max_points only by the number of nonfinite/skipped rows."""
    n_buckets = max(1, max_points // 3)
    size = math.ceil(len(rows) / n_buckets)
    kept: dict[int, dict[str, Any]] = {}
    for start in range(0, len(rows), size):
        bucket = rows[start:start + size]
        for row in bucket:
            if row["nonfinite"] or row["skipped"]:
                kept[row["step"]] = row
        finite = [r for r in bucket if r["loss"] is not None]
        if finite:
            kept.setdefault(min(finite, key=_loss_key)["step"], min(finite, key=_loss_key))
            kept.setdefault(max(finite, key=_loss_key)["step"], max(finite, key=_loss_key))
        grads = [r for r in bucket if r["grad_norm"] is not None]
        if grads:
            top = max(grads, key=lambda r: r["grad_norm"])
            kept.setdefault(top["step"], top)
        if not finite and not grads:
            kept.setdefault(bucket[0]["step"], bucket[0])
    return [kept[s] for s in sorted(kept)]


def layer_query(job_id: str, after_step: int, limit: int, layer: str | None = None) -> Select[Any]:
    """Up to `limit` per-layer rows with step > after_step in depth order: (step, position, layer), the
    key of ix_layer_metrics_job_step_position, so it is one index range scan without a sort. Rows
    written before positions were recorded have a null position and come in name order."""
    stmt = select(*_LAYER_SELECT).where(_LAYERS.job_id == job_id, _LAYERS.step > after_step)
    if layer:
        stmt = stmt.where(_LAYERS.layer == layer)
    return stmt.order_by(_LAYERS.step, _LAYERS.position, _LAYERS.layer).limit(limit)


def layer_page(job_id: str, after_step: int, limit: int, layer: str | None) -> dict[str, Any]:
    """Per-layer rows with step > after_step in depth order (see layer_query); a page never ends
    inside a step (unless one step overflows it)."""
    stmt = layer_query(job_id, after_step, limit + 1, layer)
    rows = _to_dicts(db.session.connection().execute(stmt).all(), LAYER_COLUMNS)
    if len(rows) <= limit:
        return {"items": rows, "next_after_step": None}
    rows = rows[:limit]
    last = rows[-1]["step"]
    whole = [r for r in rows if r["step"] != last]
    if whole:
        return {"items": whole, "next_after_step": whole[-1]["step"]}
    return {"items": rows, "next_after_step": last}
