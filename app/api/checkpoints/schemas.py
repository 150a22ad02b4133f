"""Checkpoint schemas."""

from __future__ import annotations

from marshmallow import Schema, fields


class CheckpointSchema(Schema):
    job_id = fields.String()
    step = fields.Integer()
    bytes = fields.Integer()
    sha256 = fields.String()
    val_loss = fields.Float(allow_none=True)
    health = fields.String(allow_none=True)
    created_at = fields.DateTime()
    download_url = fields.String()


class CheckpointListSchema(Schema):
    items = fields.List(fields.Nested(CheckpointSchema))
