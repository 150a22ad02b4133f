"""Render a job's series as PNG with matplotlib's object API (no Flask, no database here).

pyplot keeps global state and is not thread-safe, so figures are built with
`matplotlib.figure.Figure` + the Agg canvas; app.plots.service still runs one render at a time.
matplotlib is imported lazily so importing the API does not pay for it.
"""

from __future__ import annotations

import io
import math
from typing import Any

from app.plots.data import Heatmap, PlotData, Series, StepSeries

PLOT_NAMES = ("loss", "grad_norm", "lr", "layers", "activations", "grad_time")
WIDTH_PX, HEIGHT_PX, DPI = 960, 420, 100


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
    {"loss": _loss, "grad_norm": _grad_norm, "lr": _lr, "layers": _layers, "activations": _activations,
     "grad_time": _grad_time}[name](fig, ax, data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_bad_steps(ax: Any, steps: StepSeries) -> None:
    if steps.bad_steps:
        ax.vlines(steps.bad_steps, 0, 1, transform=ax.get_xaxis_transform(), colors="#d62728", alpha=0.35,
                  linewidth=1, label=f"non-finite / skipped ({steps.bad_count})")


def _line(ax: Any, series: Series, colour: str, label: str, positive: bool = False, band: bool = True,
          **style: Any) -> bool:
    """The series' last value per bucket as a line, and (when buckets hold several steps) the min..max of
    each bucket as a band around it, so a spike inside a bucket still shows. False when nothing to draw."""
    last = series.points("last", positive)
    if not last and not series.points("hi", positive):
        return False
    if last:
        ax.plot(*zip(*last, strict=True), color=colour, label=label, **{"linewidth": 1, **style})
    if band:
        lo_hi = [(x, lo, hi) for x, lo, hi in zip(series.x, series.lo, series.hi, strict=True)
                 if lo is not None and hi is not None and (not positive or lo > 0)]
        if lo_hi and any(lo != hi for _x, lo, hi in lo_hi):
            xs, los, his = zip(*lo_hi, strict=True)
            ax.fill_between(xs, los, his, color=colour, alpha=0.3, linewidth=0,
                            label=None if last else label)
    return True


def _loss(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: loss")
    lines = data.steps.lines
    drawn = _line(ax, lines["loss"], "#1f77b4", "train loss (band: min..max per bucket)"
                  if data.steps.bucket_size > 1 else "train loss")
    val = lines["val_loss"].points("hi")
    if val:
        ax.plot(*zip(*val, strict=True), color="#ff7f0e", marker="o", markersize=3, linewidth=1.2,
                label="validation loss")
    if not drawn and not val:
        _empty(ax, "metrics")
        return
    _mark_bad_steps(ax, data.steps)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def _grad_norm(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: global gradient norm")
    lines = data.steps.lines
    before = _line(ax, lines["grad_norm"], "#1f77b4", "before clipping", positive=True)
    after = _line(ax, lines["grad_norm_clipped"], "#2ca02c", "after clipping", positive=True, band=False, alpha=0.85)
    if not before and not after:
        _empty(ax, "metrics")
        return
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
    if not _line(ax, data.steps.lines["lr"], "#9467bd", "learning rate", linewidth=1.2):
        _empty(ax, "metrics")
        return
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    ax.grid(alpha=0.3)


def _heatmap(fig: Any, ax: Any, heat: Heatmap, bar_label: str, limits: tuple[float, float] | None) -> None:
    """Rows = heat.names (input at the top), columns = step buckets; `limits` fixes the colour scale, else it
    spans the data's whole decades (log10 values). NaN/inf cells in red, missing cells light grey."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    matrix = np.array([[np.nan if v is None else v for v in row] for row in heat.values], dtype=float)
    if limits is None:
        finite = matrix[np.isfinite(matrix)]
        lo = math.floor(float(finite.min())) if finite.size else -1.0
        hi = math.ceil(float(finite.max())) if finite.size else 1.0
        if hi - lo < 1:
            hi = lo + 1
        matrix[np.isneginf(matrix)] = lo  # an exactly zero gradient shows as the bottom of the scale
    else:
        lo, hi = limits
    # pcolormesh draws one quad per cell: its memory follows the cells, where imshow resamples to a float
    # RGBA array of the axes' pixels (10-20 MB for this figure, whatever the data)
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.pcolormesh(np.ma.masked_invalid(matrix), cmap=cmap, vmin=lo, vmax=hi)
    ax.invert_yaxis()  # the first row (input side) at the top
    bad_mask = np.array(heat.bad, dtype=float)
    if bad_mask.any():
        ax.pcolormesh(np.ma.masked_equal(bad_mask, 0), cmap=ListedColormap(["#ff0040"]))
        ax.text(1.0, 1.01, "red = NaN/inf", transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                color="#ff0040")
    names = heat.names
    ax.set_yticks([i + 0.5 for i in range(len(names))])
    ax.set_yticklabels(names, fontsize=max(5, min(8, int(300 / max(1, len(names))))))
    cols = heat.col_steps
    ticks = sorted({int(round(t)) for t in np.linspace(0, len(cols) - 1, num=min(8, len(cols)))})
    ax.set_xticks([t + 0.5 for t in ticks])
    ax.set_xticklabels([str(cols[t]) for t in ticks])
    ax.set_xlabel("step")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label(bar_label)


def _layers(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: per-layer gradient norm (log10)")
    if not data.heatmap.names or not data.heatmap.col_steps:
        _empty(ax, "layer statistics")
        return
    _heatmap(fig, ax, data.heatmap, "log10 grad norm", None)


ACTIVATION_TITLES = {"saturated_frac": "saturated fraction (tanh/sigmoid outputs in the flat tails)",
                     "dead_frac": "dead fraction (ReLU units off for the whole batch)"}


def _activations(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: {ACTIVATION_TITLES.get(data.heatmap_metric, data.heatmap_metric)}")
    if not data.heatmap.names or not data.heatmap.col_steps:
        _empty(ax, "activation statistics")
        return
    _heatmap(fig, ax, data.heatmap, data.heatmap_metric.replace("_", " ") + " (max per bucket)", (0.0, 1.0))


def _grad_time(fig: Any, ax: Any, data: PlotData) -> None:
    ax.set_title(f"{data.title}: gradient through time, norm(t=0) / norm(t=T-1)")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    drawn = [_line(ax, series, colours[i % len(colours)], site, positive=True)
             for i, (site, series) in enumerate(data.lines.items())]
    if not any(drawn):
        _empty(ax, "recurrent layers")
        return
    ax.axhline(1.0, color="#777", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("ratio (log; < 1: vanishing through time)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=8)
