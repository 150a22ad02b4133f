"""Webhooks resource."""

from app.api.webhooks.resources import blp

__all__ = ["blp"]
