"""What a plot draws: per-bucket aggregates made by app.plots.aggregate, drawn by app.plots.render."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Series:
    """One line, per bucket: x = the bucket's last step, and the bucket's min, max and last value (None where
    the bucket has no finite value)."""

    x: list[int] = field(default_factory=list)
    lo: list[float | None] = field(default_factory=list)
    hi: list[float | None] = field(default_factory=list)
    last: list[float | None] = field(default_factory=list)

    def points(self, which: str, positive: bool = False) -> list[tuple[int, float]]:
        """(step, value) pairs of `which` (lo, hi or last) that are set (and > 0 for log axes)."""
        return [(x, v) for x, v in zip(self.x, getattr(self, which), strict=True)
                if v is not None and (not positive or v > 0)]


@dataclass
class StepSeries:
    """The step plots' lines plus the non-finite/skipped steps (first of each bucket) and their total."""

    lines: dict[str, Series] = field(default_factory=dict)
    bad_steps: list[int] = field(default_factory=list)
    bad_count: int = 0
    bucket_size: int = 1


@dataclass
class Heatmap:
    """Rows in depth order, columns = non-empty step buckets (labelled by their last step); a cell is the
    bucket's max (None: no finite value) and `bad` marks a bucket holding a non-finite value."""

    names: list[str] = field(default_factory=list)
    col_steps: list[int] = field(default_factory=list)
    values: list[list[float | None]] = field(default_factory=list)
    bad: list[list[bool]] = field(default_factory=list)


@dataclass
class PlotData:
    """Everything one plot needs, aggregated in SQL in the request thread (app.plots.aggregate)."""

    title: str
    steps: StepSeries = field(default_factory=StepSeries)
    heatmap: Heatmap = field(default_factory=Heatmap)
    heatmap_metric: str = ""
    lines: dict[str, Series] = field(default_factory=dict)
    clip_max_norm: float | None = None
