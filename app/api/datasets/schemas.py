"""Dataset schemas."""

from __future__ import annotations

from marshmallow import Schema, fields

from app.schemas.common import CursorQuerySchema


class DatasetSchema(Schema):
    id = fields.String()
    name = fields.String()
    bytes = fields.Integer()
    sha256 = fields.String()
    created_at = fields.DateTime()


class DatasetPageSchema(Schema):
    items = fields.List(fields.Nested(DatasetSchema))
    next_cursor = fields.String(allow_none=True)


class DatasetListQuerySchema(CursorQuerySchema):
    pass
