"""Datasets resource."""

from app.api.datasets.resources import blp

__all__ = ["blp"]
