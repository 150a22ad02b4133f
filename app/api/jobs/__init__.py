"""Jobs resource."""

from app.api.jobs.resources import blp

__all__ = ["blp"]
