"""Probes resource (LR range tests of a job's spec)."""

from app.api.probes.resources import blp

__all__ = ["blp"]
