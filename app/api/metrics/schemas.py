"""Metric series schemas (responses are plain dicts; documented here)."""

from __future__ import annotations

from marshmallow import Schema, fields
from marshmallow.validate import Range

from app.schemas.common import QuerySchema
from app.schemas.fields import DB_INT_MAX


class StepQuerySchema(QuerySchema):
    after_step = fields.Integer(load_default=0, validate=Range(0, DB_INT_MAX))
    limit = fields.Integer(load_default=1000, validate=Range(1, 5000))
    max_points = fields.Integer(load_default=None, validate=Range(3, 5000))


class LayerQuerySchema(QuerySchema):
    after_step = fields.Integer(load_default=0, validate=Range(0, DB_INT_MAX))
    limit = fields.Integer(load_default=1000, validate=Range(1, 5000))
    layer = fields.String(load_default=None)


class StepRowSchema(Schema):
    step = fields.Integer()
    loss = fields.Float(allow_none=True)
    lr = fields.Float(allow_none=True)
    grad_norm = fields.Float(allow_none=True)
    grad_norm_clipped = fields.Float(allow_none=True)
    clipped = fields.Boolean()
    nonfinite = fields.Boolean()
    skipped = fields.Boolean()
    loss_scale = fields.Float(allow_none=True)
    tokens_per_s = fields.Float(allow_none=True)
    tokens_seen = fields.Integer(allow_none=True)
    val_loss = fields.Float(allow_none=True)
    time = fields.Float(allow_none=True)


class StepPageSchema(Schema):
    items = fields.List(fields.Nested(StepRowSchema))
    next_after_step = fields.Integer(allow_none=True)


class LayerRowSchema(Schema):
    """Rows come in depth order within a step (by `position`, then `layer`)."""

    step = fields.Integer()
    layer = fields.String()
    position = fields.Integer(allow_none=True, metadata={
        "description": "Depth index of the weight matrix (0 = nearest the input, the head last); "
                       "null for rows recorded before positions existed."})
    grad_norm = fields.Float(allow_none=True)
    weight_norm = fields.Float(allow_none=True)
    update_ratio = fields.Float(allow_none=True)


class LayerPageSchema(Schema):
    items = fields.List(fields.Nested(LayerRowSchema))
    next_after_step = fields.Integer(allow_none=True)
