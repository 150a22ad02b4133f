"""Schemas shared by several resources."""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, fields
from marshmallow.validate import Range

from app.schemas.cursors import cursor_field


class QuerySchema(Schema):
    """Query strings ignore unknown parameters (e.g. cache busters)."""

    class Meta:
        unknown = EXCLUDE


class CursorQuerySchema(QuerySchema):
    limit = fields.Integer(load_default=50, validate=Range(1, 200))
    cursor = cursor_field("newest")


class ErrorBodySchema(Schema):
    code = fields.String()
    message = fields.String()
    details = fields.Dict()


class ErrorSchema(Schema):
    """The error envelope."""

    error = fields.Nested(ErrorBodySchema)
