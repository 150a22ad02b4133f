"""Samples resource."""

from app.api.samples.resources import blp

__all__ = ["blp"]
