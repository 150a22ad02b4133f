"""Render a job's series as PNG with matplotlib's object API (no Flask, no database here).

pyplot keeps global state and is not thread-safe, so figures are built with
`matplotlib.figure.Figure` + the Agg canvas; app.plots.service still runs one render at a time.
matplotlib is imported lazily so importing the API does not pay for it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from app.plots.order import layer_order

PLOT_NAMES = ("loss", "grad_norm", "lr", "layers")
WIDTH_PX, HEIGHT_PX, DPI = 960, 420, 100
MAX_HEATMAP_COLUMNS = 800


@dataclass
class PlotData:
    """Everything one plot needs, loaded in the request thread."""

    title: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    clip_max_norm: float | None = None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mpl() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def render(name: str, data: PlotData) -> bytes:
    """PNG bytes of plot `name` (one of PLOT_NAMES)."""
    figure_cls, canvas_cls = _mpl()
    fig = figure_cls(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
    canvas_cls(fig)
    ax = fig.add_subplot()
    {"loss": _loss, "grad_norm": _grad_norm, "lr": _lr, "layers": _layers}[name](fig, ax, data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_bad_steps(ax: Any, steps: list[dict[str, Any]]) -> None:
    bad = [r["step"] for r in steps if r.get("nonfinite") or r.get("skipped")]
    if bad:
        ax.vlines(bad, 0, 1, transform=ax.get_xaxis_transform(), colors="#d62728", alpha=0.35, linewidth=1,
                  label=f"non-finite / skipped ({len(bad)})")


def _loss(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: loss")
    train = [(r["step"], r["loss"]) for r in data.steps if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in data.steps if _finite(r.get("val_loss"))]
    if not train and not val:
        _empty(ax, "metrics")
        return
    if train:
        ax.plot(*zip(*train, strict=True), color="#1f77b4", linewidth=1, label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), color="#ff7f0e", marker="o", markersize=3, linewidth=1.2,
                label="validation loss")
    _mark_bad_steps(ax, data.steps)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def _grad_norm(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: global gradient norm")
    before = [(r["step"], r["grad_norm"]) for r in data.steps if _finite(r.get("grad_norm")) and r["grad_norm"] > 0]
    after = [(r["step"], r["grad_norm_clipped"]) for r in data.steps
             if _finite(r.get("grad_norm_clipped")) and r["grad_norm_clipped"] > 0]
    if not before and not after:
        _empty(ax, "metrics")
        return
    if before:
        ax.plot(*zip(*before, strict=True), color="#1f77b4", linewidth=1, label="before clipping")
    if after:
        ax.plot(*zip(*after, strict=True), color="#2ca02c", linewidth=1, alpha=0.85, label="after clipping")
    if data.clip_max_norm:
        ax.axhline(data.clip_max_norm, color="#d62728", linestyle="--", linewidth=1.2,
                   label=f"clip max_norm = {data.clip_max_norm:g}")
    _mark_bad_steps(ax, data.steps)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=8)


def _lr(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: learning rate")
    points = [(r["step"], r["lr"]) for r in data.steps if _finite(r.get("lr"))]
    if not points:
        _empty(ax, "metrics")
        return
    ax.plot(*zip(*points, strict=True), color="#9467bd", linewidth=1.2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    ax.grid(alpha=0.3)


def heatmap_matrix(layers: list[dict[str, Any]], max_columns: int = MAX_HEATMAP_COLUMNS
                   ) -> tuple[list[str], list[int], list[list[float | None]], list[list[bool]]]:
    """(layer names in depth order, column steps, log10 grad norm [layer][col], non-finite mask).

    Depth order is the rows' recorded `position`, or the name heuristic for rows without one (old jobs).

    A cell is None where the layer has no row at that step. Columns are merged into at most
    `max_columns` buckets keeping each bucket's largest value (so exploding steps survive)."""
    names = layer_order(layers)
    steps = sorted({r["step"] for r in layers})
    size = max(1, math.ceil(len(steps) / max_columns))
    col_of = {s: i // size for i, s in enumerate(steps)}
    n_cols = math.ceil(len(steps) / size) if steps else 0
    row_of = {n: i for i, n in enumerate(names)}
    values: list[list[float | None]] = [[None] * n_cols for _ in names]
    bad = [[False] * n_cols for _ in names]
    for r in layers:
        i, j = row_of[r["layer"]], col_of[r["step"]]
        g = r.get("grad_norm")
        if not _finite(g):
            bad[i][j] = True
            continue
        v = math.log10(g) if g > 0 else -math.inf
        cur = values[i][j]
        values[i][j] = v if cur is None else max(cur, v)
    col_steps = [steps[min(len(steps) - 1, j * size + size - 1)] for j in range(n_cols)]
    return names, col_steps, values, bad


def _layers(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: per-layer gradient norm (log10)")
    names, col_steps, values, bad = heatmap_matrix(data.layers)
    if not names:
        _empty(ax, "layer statistics")
        return
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    matrix = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    finite = matrix[np.isfinite(matrix)]
    lo = math.floor(float(finite.min())) if finite.size else -1.0
    hi = math.ceil(float(finite.max())) if finite.size else 1.0
    if hi - lo < 1:
        hi = lo + 1
    matrix[np.isneginf(matrix)] = lo  # an exactly zero gradient shows as the bottom of the scale
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap=cmap,
                      vmin=lo, vmax=hi, origin="upper")
    bad_mask = np.array(bad, dtype=float)
    if bad_mask.any():
        ax.imshow(np.ma.masked_equal(bad_mask, 0), aspect="auto", interpolation="nearest",
                  cmap=ListedColormap(["#ff0040"]), origin="upper")
        ax.text(1.0, 1.01, "red = NaN/inf", transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                color="#ff0040")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=max(5, min(8, int(300 / max(1, len(names))))))
    ticks = sorted({int(round(t)) for t in np.linspace(0, len(col_steps) - 1, num=min(8, len(col_steps)))})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(col_steps[t]) for t in ticks])
    ax.set_xlabel("step")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("log10 grad norm")
