"""Metric series schemas (responses are plain dicts; documented here)."""

from __future__ import annotations

from marshmallow import Schema, fields
from marshmallow.validate import Range, Regexp

from app.schemas.common import QuerySchema
from app.schemas.cursors import cursor_field
from app.schemas.fields import DB_INT_MAX

# app.inputs answers NUL in any query parameter with a 422 (PostgreSQL cannot hold it); the pattern says so
NO_NUL = Regexp(r"^[^\x00]*$", error="Text must not contain NUL characters.")


def name_filter(description: str) -> fields.String:
    """An optional exact-match filter on a name (any text without NUL; an unknown name matches no rows)."""
    return fields.String(load_default=None, validate=NO_NUL, metadata={"description": description})


NEXT_CURSOR = {"description": "Cursor of the next page (pass it as `cursor`); null when this page is the last."}


class _StepPagedQuery(QuerySchema):
    """`after_step` (rows with a larger step) or `cursor` (rows after the previous page's last row)."""

    after_step = fields.Integer(load_default=None, validate=Range(0, DB_INT_MAX), metadata={
        "description": "Start with the rows of the first step after this one (default 0: from the start)."})
    limit = fields.Integer(load_default=1000, validate=Range(1, 5000))


class StepQuerySchema(_StepPagedQuery):
    cursor = cursor_field("steps", "after_step")
    max_points = fields.Integer(load_default=None, validate=Range(3, 5000))


class LayerQuerySchema(_StepPagedQuery):
    cursor = cursor_field("layers", "after_step")
    layer = name_filter("Only this weight matrix (e.g. head.weight).")


class ActivationQuerySchema(_StepPagedQuery):
    cursor = cursor_field("activations", "after_step")
    site = name_filter("Only this site (module path, e.g. layers.0.rnn).")


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
    next_cursor = fields.String(allow_none=True, metadata=NEXT_CURSOR)
    next_after_step = fields.Integer(allow_none=True, metadata={
        "description": "Last step of this page when more may follow (the same place as next_cursor), else null."})


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
    next_cursor = fields.String(allow_none=True, metadata=NEXT_CURSOR)


class ActivationRowSchema(Schema):
    """One activation site at one step; rows come in (step, position, site) order. Which statistics are set
    depends on `kind`; the others are null, as are values that were NaN/inf."""

    step = fields.Integer()
    site = fields.String(metadata={"description": "Module path, e.g. layers.0.rnn, blocks.1.mlp.act, head."})
    position = fields.Integer(metadata={"description": "Depth index of the site (0 = nearest the input)."})
    kind = fields.String(metadata={"description": "tanh, sigmoid, relu, leaky_relu, gelu, silu, elu, attention, "
                                                  "recurrent or output."})
    mean = fields.Float(allow_none=True)
    std = fields.Float(allow_none=True)
    saturated_frac = fields.Float(allow_none=True, metadata={
        "description": "tanh/sigmoid (and tanh-RNN outputs): fraction of outputs in the flat tails."})
    dead_frac = fields.Float(allow_none=True, metadata={
        "description": "ReLU family: fraction of units whose pre-activation is <= 0 for the whole batch."})
    attn_max_logit = fields.Float(allow_none=True)
    attn_entropy = fields.Float(allow_none=True, metadata={"description": "Nats, mean over heads and rows."})
    z_lse = fields.Float(allow_none=True, metadata={"description": "Output site: mean log-sum-exp of the logits."})
    grad_time = fields.List(fields.List(fields.Float(allow_none=True)), allow_none=True, metadata={
        "description": "Recurrent sites: [[t, norm of dL_last/dh_t], ...] for t = 0, T/4, T/2, 3T/4, T-1."})
    grad_time_ratio = fields.Float(allow_none=True, metadata={
        "description": "Norm at t=0 divided by the norm at t=T-1 (tiny: gradients vanish through time)."})


class ActivationPageSchema(Schema):
    items = fields.List(fields.Nested(ActivationRowSchema))
    next_cursor = fields.String(allow_none=True, metadata=NEXT_CURSOR)
