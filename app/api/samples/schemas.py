"""Sample schemas."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields
from marshmallow.validate import Length, Range

from app.schemas.common import QuerySchema
from app.schemas.fields import DB_INT_MAX, StrictFloat, StrictInteger


class SampleRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    prompt = fields.String(required=True, validate=Length(max=100_000))
    max_new_tokens = StrictInteger(load_default=200, validate=Range(1, 2000))
    temperature = StrictFloat(load_default=1.0, validate=Range(0, 5))
    top_k = StrictInteger(load_default=None, allow_none=True, validate=Range(min=1))
    seed = StrictInteger(load_default=0, validate=Range(0, 2**63 - 1))
    step = StrictInteger(load_default=None, allow_none=True, validate=Range(0, DB_INT_MAX))


MAX_WAIT_S = 10


class SampleWaitSchema(QuerySchema):
    wait = fields.Float(load_default=0.0, validate=Range(0, MAX_WAIT_S), metadata={
        "description": f"Seconds (0 to {MAX_WAIT_S}) to wait for the text before answering 202; "
                       "0 (the default) answers at once. Best effort: while the server already holds "
                       "its share of waiting requests it answers 202 at once."})


class SampleSchema(Schema):
    id = fields.String()
    job_id = fields.String()
    checkpoint_step = fields.Integer()
    prompt = fields.String()
    params = fields.Dict()
    status = fields.String()
    text = fields.String(allow_none=True)
    error = fields.String(allow_none=True)
    created_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)
