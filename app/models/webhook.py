"""Webhook endpoints and their transactional outbox (Standard Webhooks, docs/contracts.md "Webhooks").

An event is written as one `WebhookMessage` (its id is the `webhook-id` every attempt carries) and one
`WebhookDelivery` per subscribed endpoint, in the same transaction as the state change it reports; the
`webhooks` Celery queue sends them (worker/webhooks.py), and the relay re-sends any delivery that is due
and whose message was lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models._common import UTCDateTime, new_id, utcnow

WEBHOOK_EVENTS = ("job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled", "job.paused",
                  "job.health_changed", "checkpoint.created")
# pending: an attempt is due at next_attempt_at; succeeded: a 2xx came back; failed: the schedule ran out,
# or the endpoint was disabled (a 410 Gone)
DELIVERY_STATUSES = ("pending", "succeeded", "failed")


class WebhookEndpoint(db.Model):
    """A receiver URL of one API key, subscribed to some event types."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_owner_created", "owner_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("wh"))
    owner_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    # kept in clear: every delivery is signed with it (HMAC needs the key itself, not a hash)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # set when the receiver answered 410 Gone (Standard Webhooks: stop sending); nothing is recorded
    # or sent for a disabled endpoint until POST /v1/webhooks/{id}/enable clears it
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookMessage(db.Model):
    """One event: `{type, timestamp, data}`; its id is the `webhook-id` header of every attempt."""

    __tablename__ = "webhook_messages"
    __table_args__ = (Index("ix_webhook_messages_owner_created", "owner_id", "created_at"),
                      # retention: the oldest messages first (worker.webhooks.prune_webhook_messages)
                      Index("ix_webhook_messages_created", "created_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))
    owner_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(db.Model):
    """One message to one endpoint: its attempts so far and when the next one is due."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
        # the relay's scan: pending deliveries that are due
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_message", "message_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dlv"))
    message_id: Mapped[str] = mapped_column(String(40), ForeignKey("webhook_messages.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(String(40), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the database's time of the next attempt (null once succeeded or failed); a sender's claim moves it
    # past the attempt's longest duration, so a sender that dies mid-attempt is retried by the relay
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # when a broker message for the due attempt was sent (or, for a Celery retry, is due to arrive);
    # null: none sent yet. The relay sends due deliveries whose message is missing or overdue.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # the latest attempts, oldest first: [{at, status_code, error, duration_ms}] (at most ATTEMPT_LOG_SIZE)
    log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
