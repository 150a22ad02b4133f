"""The numbers a PNG plot draws, aggregated in SQL: never a whole series in Python.

A plot is at most ~1,000 pixels wide, so every series is cut into at most MAX_BUCKETS buckets of
consecutive steps (GROUP BY (step - first) / size, integer division on SQLite and PostgreSQL) and the
database returns per bucket its min, max and last value. A spike at a single step is its bucket's max, so
it stays visible at any length; memory is bounded by the number of buckets, not of steps.

NaN/inf never enter an aggregate: `_finite` keeps values strictly between -FLOAT_MAX and FLOAT_MAX, which
drops +-inf on both databases and NaN on PostgreSQL (where NaN sorts above every number; SQLite stores
NaN as null). Non-finite and skipped steps are counted per bucket instead, and the first of them marked.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select

from app.extensions import db
from app.models import ActivationMetric, LayerMetric, StepMetric
from app.plots.data import Heatmap, Series, StepSeries

MAX_BUCKETS = 1_000  # about one per pixel of the 960 px wide plots
MAX_HEATMAP_COLUMNS = 800
FLOAT_MAX = sys.float_info.max

_STEPS = StepMetric.__table__.c
_LAYERS = LayerMetric.__table__.c
_ACTS = ActivationMetric.__table__.c


def _finite(column: Any) -> ColumnElement[Any]:
    return case((and_(column > -FLOAT_MAX, column < FLOAT_MAX), column), else_=None)


def _bucket_size(first: int, last: int, buckets: int) -> int:
    return max(1, math.ceil((last - first + 1) / buckets))


def _range(table: Any, job_id: str, *where: Any) -> tuple[int, int, int] | None:
    """(first step, last step, distinct steps) of a job's rows, or None when there are none."""
    row = db.session.execute(select(func.min(table.step), func.max(table.step), func.count(table.step.distinct()))
                             .where(table.job_id == job_id, *where)).one()
    return None if row[0] is None else (int(row[0]), int(row[1]), int(row[2]))


STEP_LINES = ("loss", "val_loss", "grad_norm", "grad_norm_clipped", "lr")


def step_series(job_id: str, names: tuple[str, ...] = STEP_LINES, buckets: int = MAX_BUCKETS) -> StepSeries:
    """Per-bucket min/max/last of the step columns `names`, in step order (one GROUP BY query, then one
    join to read each bucket's last row)."""
    out = StepSeries(lines={n: Series() for n in names})
    bounds = _range(_STEPS, job_id)
    if bounds is None:
        return out
    first, last, _count = bounds
    size = out.bucket_size = _bucket_size(first, last, buckets)
    bad = or_(_STEPS.nonfinite, _STEPS.skipped)
    grouped = (select((_STEPS.step - first) // size, func.max(_STEPS.step).label("last_step"),
                      func.sum(case((bad, 1), else_=0)).label("bad"), func.min(case((bad, _STEPS.step))).label("bad_step"),
                      *[func.min(_finite(_STEPS[n])).label(f"lo_{n}") for n in names],
                      *[func.max(_finite(_STEPS[n])).label(f"hi_{n}") for n in names])
               .where(_STEPS.job_id == job_id).group_by((_STEPS.step - first) // size).subquery())
    stmt = (select(grouped, *[_finite(_STEPS[n]).label(f"last_{n}") for n in names])
            .join_from(grouped, StepMetric.__table__, and_(_STEPS.job_id == job_id, _STEPS.step == grouped.c.last_step))
            .order_by(grouped.c.last_step))
    for row in db.session.execute(stmt).mappings():
        for n in names:
            line = out.lines[n]
            line.x.append(int(row["last_step"]))
            line.lo.append(row[f"lo_{n}"])
            line.hi.append(row[f"hi_{n}"])
            line.last.append(row[f"last_{n}"])
        if row["bad"]:
            out.bad_count += int(row["bad"])
            out.bad_steps.append(int(row["bad_step"]))
    return out


def _grid(cells: list[tuple[str, int, int, float | None, bool]], order: list[str]) -> Heatmap:
    """Heatmap from (name, bucket, last step, max value, has non-finite) cells; only buckets with a row
    become columns, labelled by their last recorded step."""
    columns = sorted({c[1] for c in cells})
    col_of = {b: j for j, b in enumerate(columns)}
    row_of = {n: i for i, n in enumerate(order)}
    values: list[list[float | None]] = [[None] * len(columns) for _ in order]
    bad = [[False] * len(columns) for _ in order]
    col_steps = [0] * len(columns)
    for name, bucket, step, value, nonfinite in cells:
        i, j = row_of[name], col_of[bucket]
        values[i][j] = value
        bad[i][j] = nonfinite
        col_steps[j] = max(col_steps[j], step)
    return Heatmap(order, col_steps, values, bad)


def _heatmap_size(bounds: tuple[int, int, int], max_columns: int) -> int:
    """Bucket width in steps: about the spacing of the recorded steps, widened to fit max_columns."""
    first, last, count = bounds
    return _bucket_size(first, last, min(count, max_columns))


def layer_heatmap(job_id: str, max_columns: int = MAX_HEATMAP_COLUMNS) -> Heatmap:
    """log10 of each layer's largest finite gradient norm per step bucket; depth order as app.plots.order."""
    from app.plots.order import layer_order

    bounds = _range(_LAYERS, job_id)
    if bounds is None:
        return Heatmap()
    first, size = bounds[0], _heatmap_size(bounds, max_columns)
    positions = db.session.execute(select(_LAYERS.layer, func.max(_LAYERS.position))
                                   .where(_LAYERS.job_id == job_id).group_by(_LAYERS.layer)).all()
    order = layer_order({"layer": name, "position": p} for name, p in positions)
    bucket = (_LAYERS.step - first) // size
    finite = _finite(_LAYERS.grad_norm)
    rows = db.session.execute(
        select(_LAYERS.layer, bucket, func.max(_LAYERS.step), func.max(finite),
               func.sum(case((finite.is_(None), 1), else_=0)))
        .where(_LAYERS.job_id == job_id).group_by(_LAYERS.layer, bucket)).all()
    cells = [(name, int(b), int(step), None if g is None else (math.log10(g) if g > 0 else -math.inf), bool(n_bad))
             for name, b, step, g, n_bad in rows]
    return _grid(cells, order)


ACTIVATION_FRACTIONS = ("saturated_frac", "dead_frac")


def activation_heatmap(job_id: str, metric: str, max_columns: int = MAX_HEATMAP_COLUMNS) -> Heatmap:
    """Each site's largest `metric` (saturated_frac or dead_frac) per step bucket, sites in depth order;
    only sites that report it (tanh/sigmoid/recurrent for saturation, the ReLU family for dead units)."""
    column = _ACTS[metric]
    bounds = _range(_ACTS, job_id, column.is_not(None))
    if bounds is None:
        return Heatmap()
    first, size = bounds[0], _heatmap_size(bounds, max_columns)
    sites = db.session.execute(select(_ACTS.site, func.min(_ACTS.position)).where(
        _ACTS.job_id == job_id, column.is_not(None)).group_by(_ACTS.site)).all()
    order = [site for site, _p in sorted(sites, key=lambda s: (s[1], s[0]))]
    bucket = (_ACTS.step - first) // size
    rows = db.session.execute(select(_ACTS.site, bucket, func.max(_ACTS.step), func.max(_finite(column)))
                              .where(_ACTS.job_id == job_id, column.is_not(None)).group_by(_ACTS.site, bucket)).all()
    return _grid([(site, int(b), int(step), v, False) for site, b, step, v in rows], order)


def activation_metric(job_id: str) -> str:
    """The fraction activations.png shows: saturation when any site reports it, else dead units."""
    for metric in ACTIVATION_FRACTIONS:
        if db.session.execute(select(_ACTS.step).where(_ACTS.job_id == job_id, _ACTS[metric].is_not(None))
                              .limit(1)).first():
            return metric
    return ACTIVATION_FRACTIONS[0]


def grad_time_series(job_id: str, buckets: int = MAX_BUCKETS) -> dict[str, Series]:
    """Per recurrent site (depth order): per step bucket the min and max finite grad_time_ratio (last = min,
    the worst vanishing in the bucket)."""
    bounds = _range(_ACTS, job_id, _ACTS.grad_time_ratio.is_not(None))
    if bounds is None:
        return {}
    first, size = bounds[0], _heatmap_size(bounds, buckets)
    ratio = _finite(_ACTS.grad_time_ratio)
    rows = db.session.execute(
        select(_ACTS.site, func.min(_ACTS.position), func.max(_ACTS.step), func.min(ratio), func.max(ratio))
        .where(_ACTS.job_id == job_id, _ACTS.grad_time_ratio.is_not(None))
        .group_by(_ACTS.site, (_ACTS.step - first) // size)).all()
    depth = {}
    lines: dict[str, Series] = {}
    for site, position, step, lo, hi in sorted(rows, key=lambda r: (r[2], r[0])):
        depth[site] = min(position, depth.get(site, position))
        line = lines.setdefault(site, Series())
        line.x.append(int(step))
        line.lo.append(lo)
        line.hi.append(hi)
        line.last.append(lo)
    return {site: lines[site] for site in sorted(lines, key=lambda s: (depth[s], s))}


def last_step(job_id: str, table: Any) -> int:
    """Newest step of a job's rows in `table` (0 when none): the plots' cache key."""
    value = db.session.execute(select(func.max(table.step)).where(table.job_id == job_id)).scalar_one_or_none()
    return int(value or 0)
