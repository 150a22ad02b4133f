"""Checkpoints resource."""

from app.api.checkpoints.resources import blp

__all__ = ["blp"]
