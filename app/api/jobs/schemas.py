"""Job schemas (the spec itself lives in app.schemas.spec)."""

from __future__ import annotations

from marshmallow import Schema, fields
from marshmallow.validate import OneOf, Range

from app.models import JOB_STATUSES
from app.schemas.common import CursorQuerySchema, QuerySchema
from app.schemas.cursors import cursor_field
from app.schemas.fields import DB_INT_MAX


class ProgressSchema(Schema):
    step = fields.Integer()
    max_steps = fields.Integer()
    fraction = fields.Float()
    tokens_seen = fields.Integer()
    eta_s = fields.Float(allow_none=True)


class JobSchema(Schema):
    id = fields.String()
    name = fields.String()
    status = fields.String()
    dataset_id = fields.String(allow_none=True)
    spec = fields.Dict()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    enqueued_at = fields.DateTime(allow_none=True)
    progress = fields.Nested(ProgressSchema)
    latest = fields.Dict(allow_none=True)
    health = fields.String()
    error = fields.String(allow_none=True)
    attempts = fields.Integer()
    cancel_requested = fields.Boolean()


class JobPageSchema(Schema):
    items = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)


class JobListQuerySchema(CursorQuerySchema):
    status = fields.String(load_default=None, validate=OneOf(JOB_STATUSES))


class DiagnosisSchema(Schema):
    job_id = fields.String()
    status = fields.String()
    health = fields.String()
    findings = fields.List(fields.Dict())
    summary = fields.String(allow_none=True)


class EventSchema(Schema):
    id = fields.Integer()
    step = fields.Integer(allow_none=True)
    kind = fields.String()
    message = fields.String()
    data = fields.Dict(allow_none=True)
    created_at = fields.DateTime()


class EventPageSchema(Schema):
    items = fields.List(fields.Nested(EventSchema))
    next_cursor = fields.String(allow_none=True, metadata={
        "description": "Cursor of the next page (pass it as `cursor`); null when this page is the last."})
    next_after_id = fields.Integer(allow_none=True, metadata={
        "description": "Id of the last event of this page when more may follow (the same place as next_cursor)."})


class EventQuerySchema(QuerySchema):
    after_id = fields.Integer(load_default=None, validate=Range(0, DB_INT_MAX), metadata={
        "description": "Start with the first event after this id (default 0: from the start)."})
    cursor = cursor_field("events", "after_id")
    limit = fields.Integer(load_default=100, validate=Range(1, 1000))

