"""Checkpoint schemas."""

from __future__ import annotations

from marshmallow import Schema, fields
from marshmallow.validate import OneOf, Range

from app.schemas.common import QuerySchema
from stabletrain_export.rules import FORMATS


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


class ExportQuerySchema(QuerySchema):
    format = fields.String(load_default="hf", validate=OneOf(FORMATS),
                           metadata={"description": "hf: a .tar.gz of a Hugging Face GPT-2 folder; "
                                                    "safetensors: the weights with the engine config in the metadata"})
    wait = fields.Float(load_default=10.0, validate=Range(0, 30),
                        metadata={"description": "seconds to wait for a worker to write the export"})


class ExportPendingSchema(Schema):
    job_id = fields.String()
    step = fields.Integer()
    format = fields.String()
    status = fields.String(metadata={"description": "pending: a worker is writing the export; ask again"})
    retry_after_s = fields.Integer()
