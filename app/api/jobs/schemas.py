"""Job schemas (the spec itself lives in app.schemas.spec)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields
from marshmallow.validate import Length, OneOf, Range, Regexp

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
    status = fields.String(metadata={"description": "queued, running, pausing, paused, cancelling, succeeded, "
                                                     "failed or cancelled"})
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
    paused_at = fields.DateTime(allow_none=True, metadata={"description": "When the job became paused (null unless paused)"})
    parent_id = fields.String(allow_none=True, metadata={"description": "The job this one retries (null otherwise)"})
    applied_patch = fields.List(fields.Nested(lambda: PatchEntrySchema()), allow_none=True, metadata={
        "description": "A retry's spec changes in the order applied (null for a plain submission)"})
    children = fields.List(fields.String(), metadata={
        "description": "Ids of the jobs retried from this one, oldest first (single-job answers only, "
                       "not in GET /v1/jobs listings)"})


class PatchEntrySchema(Schema):
    field = fields.String(metadata={"description": "Dotted spec path, e.g. model.activation"})
    value = fields.Raw(allow_none=True, metadata={"description": "The value set there (a dict merges into the section)"})
    from_finding = fields.String(allow_none=True, metadata={
        "description": "Kind of the finding that recommended it; null for an explicit override"})


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


MAX_OVERRIDES = 64
# A dotted spec path: "training.max_steps", "stabilization.clip".
SPEC_PATH = Regexp(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$", error="is not a dotted spec path like training.max_steps")
APPLY_DOC = {
    "description": '"recommendations": every recommendation of the job\'s diagnosis; a list of finding kinds: '
                   "only those findings' recommendations ([] applies the overrides only). When two "
                   "recommendations target the same field, the most severe finding's wins.",
    "oneOf": [{"type": "string", "enum": ["recommendations"]},
              {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}, "maxItems": 32}],
}


class ApplyField(fields.Field):
    """"recommendations", or a list of finding kinds."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | list[str]:
        if value == "recommendations":
            return value
        if (isinstance(value, list) and len(value) <= 32
                and all(isinstance(kind, str) and 0 < len(kind) <= 64 for kind in value)):
            return list(dict.fromkeys(value))
        raise ValidationError('must be "recommendations" or a list of finding kinds (e.g. ["vanishing"])')


def _at_most_max_overrides(value: dict[str, Any]) -> None:
    # a Length validator would be documented as maxLength, which means nothing for an object
    if len(value) > MAX_OVERRIDES:
        raise ValidationError(f"at most {MAX_OVERRIDES} fields")


class RetryRequestSchema(Schema):
    """POST /v1/jobs/{id}/retry."""

    apply = ApplyField(required=True, metadata=APPLY_DOC)
    overrides = fields.Dict(
        keys=fields.String(validate=[Length(1, 200), SPEC_PATH]), values=fields.Raw(allow_none=True),
        load_default=dict, validate=_at_most_max_overrides,
        metadata={"maxProperties": MAX_OVERRIDES,
                  "description": "Dotted spec paths and values set after the recommendations, e.g. "
                                 '{"training.max_steps": 500}; a dict value merges into a section'})

