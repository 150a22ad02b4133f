"""Webhook schemas."""

from __future__ import annotations

from marshmallow import Schema, fields
from marshmallow.validate import Length, OneOf

from app.models import DELIVERY_STATUSES, WEBHOOK_EVENTS
from app.schemas.common import CursorQuerySchema
from app.services.webhook_urls import MAX_URL_LENGTH


class WebhookCreateSchema(Schema):
    url = fields.String(required=True, validate=Length(1, MAX_URL_LENGTH), metadata={
        "description": "Receiver URL: https (http only where the server allows it), on a public address"})
    events = fields.List(fields.String(validate=OneOf(WEBHOOK_EVENTS)), required=True, validate=Length(1, 20),
                         metadata={"description": "Event types to send: " + ", ".join(WEBHOOK_EVENTS)})


class WebhookSchema(Schema):
    id = fields.String()
    url = fields.String()
    events = fields.List(fields.String())
    created_at = fields.DateTime()
    disabled_at = fields.DateTime(allow_none=True, metadata={
        "description": "Set when the receiver answered 410 Gone: nothing is sent (or recorded) for it until "
                       "POST /v1/webhooks/{id}/enable"})
    disabled_reason = fields.String(allow_none=True)


class WebhookCreatedSchema(WebhookSchema):
    secret = fields.String(metadata={
        "description": "Signing secret (whsec_ + base64), shown only in this answer: verify the "
                       "webhook-signature header with it"})


class WebhookPageSchema(Schema):
    items = fields.List(fields.Nested(WebhookSchema))
    next_cursor = fields.String(allow_none=True)


class AttemptSchema(Schema):
    at = fields.String(metadata={"description": "When the attempt ended (ISO 8601)"})
    status_code = fields.Integer(allow_none=True, metadata={"description": "HTTP status; null when none came back"})
    error = fields.String(allow_none=True)
    duration_ms = fields.Integer()


class DeliverySchema(Schema):
    id = fields.String()
    webhook_id = fields.String(metadata={"description": "The webhook-id header: the same on every attempt"})
    event_type = fields.String()
    status = fields.String(validate=OneOf(DELIVERY_STATUSES), metadata={
        "description": "pending (an attempt is due at next_attempt_at), succeeded, or failed (retries spent, "
                       "or the endpoint was disabled: see last_error)"})
    attempts = fields.Integer()
    next_attempt_at = fields.DateTime(allow_none=True)
    last_attempt_at = fields.DateTime(allow_none=True)
    last_status_code = fields.Integer(allow_none=True)
    last_error = fields.String(allow_none=True)
    delivered_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime()
    log = fields.List(fields.Nested(AttemptSchema), metadata={"description": "The latest attempts, oldest first"})


class DeliveryPageSchema(Schema):
    items = fields.List(fields.Nested(DeliverySchema))
    next_cursor = fields.String(allow_none=True)


class WebhookListQuerySchema(CursorQuerySchema):
    pass
