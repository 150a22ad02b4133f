"""Shared marshmallow schemas (the job spec and common pieces)."""
