"""PNG plots of a job's metrics (matplotlib, Agg): GET /v1/jobs/{id}/plots/{name}.png."""

from app.plots.resources import blp

__all__ = ["blp"]
