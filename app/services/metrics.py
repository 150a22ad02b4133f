"""Metric series reads: one indexed range query, plain dicts, optional spike-keeping downsampling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, or_, select

from app.extensions import db
from app.models import ActivationMetric, LayerMetric, StepMetric
from app.services import cursors

STEP_COLUMNS = ("step", "loss", "lr", "grad_norm", "grad_norm_clipped", "clipped", "nonfinite", "skipped",
                "loss_scale", "tokens_per_s", "tokens_seen", "val_loss", "time")
LAYER_COLUMNS = ("step", "layer", "position", "grad_norm", "weight_norm", "update_ratio")
ACTIVATION_COLUMNS = ("step", "site", "position", "kind", "mean", "std", "saturated_frac", "dead_frac",
                      "attn_max_logit", "attn_entropy", "z_lse", "grad_time", "grad_time_ratio")
# Core table columns: rows come back as plain tuples without the ORM loading layer
_STEP_SELECT = [StepMetric.__table__.c[c] for c in STEP_COLUMNS]
_LAYER_SELECT = [LayerMetric.__table__.c[c] for c in LAYER_COLUMNS]
_ACTIVATION_SELECT = [ActivationMetric.__table__.c[c] for c in ACTIVATION_COLUMNS]
_STEPS = StepMetric.__table__.c
_LAYERS = LayerMetric.__table__.c
_ACTIVATIONS = ActivationMetric.__table__.c


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


def step_page(job_id: str, after_step: int | None, cursor: str | None, limit: int,
              max_points: int | None) -> dict[str, Any]:
    """Rows after the cursor's step and with step > after_step (both optional), at most `limit`,
    downsampled to about max_points when given.

    `next_cursor` (and `next_after_step`, the same place as a number) points after the last row of this
    range, not of the downsampled items, so the pages of a downsampled read still join up; null at the end.
    Non-finite floats are returned as null by the view; the row's `nonfinite` flag tells them apart.
    """
    start = max(cursors.decode("steps", cursor).number if cursor else 0, after_step or 0)
    raw = _step_rows(job_id, start, limit + 1)
    more = len(raw) > limit
    rows = _to_dicts(raw[:limit], STEP_COLUMNS)
    last = rows[-1]["step"] if more else None
    if max_points is not None and len(rows) > max_points:
        rows = downsample(rows, max_points)
    return {"items": rows, "next_cursor": None if last is None else cursors.encode("steps", cursors.RowKey(last)),
            "next_after_step": last}


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


@dataclass(frozen=True)
class _DepthListing:
    """A listing in (step, position, name) order: layer rows (name = layer) or activation rows (name = site)."""

    listing: str
    columns: tuple[str, ...]
    select: list[Any]
    table: Any
    name: str


_LAYER_LISTING = _DepthListing("layers", LAYER_COLUMNS, _LAYER_SELECT, _LAYERS, "layer")
_ACTIVATION_LISTING = _DepthListing("activations", ACTIVATION_COLUMNS, _ACTIVATION_SELECT, _ACTIVATIONS, "site")


def _nulls_sort_last() -> bool:
    """Where an ascending index puts null positions: last on PostgreSQL, first on SQLite. The listing keeps the
    database's own order (so a page is an index range scan) and the cursor predicate follows it."""
    return db.session.get_bind().dialect.name != "sqlite"


def _after_key(table: Any, name: Any, key: cursors.RowKey) -> ColumnElement[bool]:
    """Rows after `key` in (step, position, name) order. Within one step, rows of an old job have null
    positions (name order) and never mix with positioned rows in practice; the predicate is right either way.
    `step >= key` on its own keeps the scan an index range starting at the cursor's step."""
    position = table.position
    if key.position is None:
        within = and_(position.is_(None), name > key.name)
        if not _nulls_sort_last():
            within = or_(within, position.is_not(None))
    else:
        within = or_(position > key.position, and_(position == key.position, name > key.name))
        if _nulls_sort_last():
            within = or_(within, position.is_(None))
    return and_(table.step >= key.number, or_(table.step > key.number, and_(table.step == key.number, within)))


def _depth_query(spec: _DepthListing, job_id: str, start: int | cursors.RowKey, limit: int,
                 only: str | None, after_step: int = 0) -> Select[Any]:
    table, name = spec.table, spec.table[spec.name]
    stmt = select(*spec.select).where(table.job_id == job_id)
    stmt = stmt.where(table.step > start if isinstance(start, int) else _after_key(table, name, start))
    if after_step and not isinstance(start, int):
        stmt = stmt.where(table.step > after_step)
    if only:
        stmt = stmt.where(name == only)
    return stmt.order_by(table.step, table.position, name).limit(limit)


def layer_query(job_id: str, start: int | cursors.RowKey, limit: int, layer: str | None = None) -> Select[Any]:
    """Up to `limit` per-layer rows after `start` (a step, or a cursor's row key) in depth order: (step,
    position, layer), the key of ix_layer_metrics_job_step_position, so it is one index range scan without a
    sort. Rows written before positions were recorded have a null position and come in name order."""
    return _depth_query(_LAYER_LISTING, job_id, start, limit, layer)


def activation_query(job_id: str, start: int | cursors.RowKey, limit: int, site: str | None = None) -> Select[Any]:
    """Up to `limit` activation rows after `start` in (step, position, site) order, the key of
    ix_activation_metrics_job_step_position."""
    return _depth_query(_ACTIVATION_LISTING, job_id, start, limit, site)


def _depth_page(spec: _DepthListing, job_id: str, after_step: int | None, cursor: str | None, limit: int,
                only: str | None) -> dict[str, Any]:
    start: int | cursors.RowKey = cursors.decode(spec.listing, cursor) if cursor else (after_step or 0)
    stmt = _depth_query(spec, job_id, start, limit + 1, only, after_step or 0)
    rows = _to_dicts(db.session.connection().execute(stmt).all(), spec.columns)
    if len(rows) <= limit:
        return {"items": rows, "next_cursor": None}
    rows = rows[:limit]
    last = rows[-1]
    key = cursors.RowKey(last["step"], last["position"], last[spec.name])
    return {"items": rows, "next_cursor": cursors.encode(spec.listing, key)}


def layer_page(job_id: str, after_step: int | None, cursor: str | None, limit: int,
               layer: str | None) -> dict[str, Any]:
    """Per-layer rows in depth order (see layer_query) after the cursor's row and with step > after_step
    (both optional). A page may end inside a step: the cursor holds the whole (step, position, layer) key
    of its last row."""
    return _depth_page(_LAYER_LISTING, job_id, after_step, cursor, limit, layer)


def activation_page(job_id: str, after_step: int | None, cursor: str | None, limit: int,
                    site: str | None) -> dict[str, Any]:
    """Activation rows in (step, position, site) order after the cursor's row and with step > after_step."""
    return _depth_page(_ACTIVATION_LISTING, job_id, after_step, cursor, limit, site)
