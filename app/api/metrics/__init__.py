"""Metrics resource."""

from app.api.metrics.resources import blp

__all__ = ["blp"]
