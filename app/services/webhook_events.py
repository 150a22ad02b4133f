"""Recording webhook events in the transaction of the change they report (the outbox's write side).

Neutral: the API (db.session) and the worker (a Connection inside `engine.begin()`) both call these
with whatever they are writing through, so the event commits or rolls back with the state change.
Nothing here talks to the network; worker/webhooks.py sends what is recorded.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from app.models import Job, WebhookDelivery, WebhookEndpoint, WebhookMessage, new_id
from app.services.common import without_nonfinite

Writer = Session | Connection

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
JOB_STATUS_EVENTS = {"queued": "job.queued", "running": "job.running", "succeeded": "job.succeeded",
                     "failed": "job.failed", "cancelled": "job.cancelled", "paused": "job.paused"}


def subscribed_endpoints(writer: Writer, owner_id: str, event_type: str) -> list[str]:
    """Ids of the owner's enabled endpoints subscribed to `event_type` (one indexed read; usually empty)."""
    rows = writer.execute(select(WebhookEndpoint.id, WebhookEndpoint.events)
                          .where(WebhookEndpoint.owner_id == owner_id, WebhookEndpoint.disabled_at.is_(None))).all()
    return [row.id for row in rows if event_type in (row.events or ())]


def iso_timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with a Z, as Standard Webhooks payloads carry it."""
    moment = (moment or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_webhook_event(writer: Writer, owner_id: str, event_type: str, data: dict[str, Any]) -> str | None:
    """Record one event for the owner's subscribed endpoints in the caller's transaction.

    Returns the message id (the `webhook-id`), or None when no endpoint of the owner wants this
    event type: then nothing is written (the fast path, one read). Each delivery is due at once;
    the relay sends it after the commit."""
    endpoint_ids = subscribed_endpoints(writer, owner_id, event_type)
    if not endpoint_ids:
        return None
    message_id = new_id("msg")
    now = datetime.now(timezone.utc)
    payload = {"type": event_type, "timestamp": iso_timestamp(now), "data": without_nonfinite(data)}
    writer.execute(WebhookMessage.__table__.insert().values(
        id=message_id, owner_id=owner_id, event_type=event_type, payload=payload, created_at=now))
    writer.execute(WebhookDelivery.__table__.insert(), [
        {"id": new_id("dlv"), "message_id": message_id, "endpoint_id": endpoint_id, "event_type": event_type,
         "status": "pending", "attempts": 0, "next_attempt_at": now, "enqueued_at": None, "created_at": now}
        for endpoint_id in endpoint_ids])
    return message_id


def job_data(writer: Writer, job_id: str) -> tuple[str, dict[str, Any]] | None:
    """(owner id, the job's public summary) as this transaction sees it; None when the job is gone."""
    row = writer.execute(select(Job.owner_id, Job.id, Job.name, Job.status, Job.step, Job.max_steps, Job.health,
                                Job.error, Job.parent_id).where(Job.id == job_id)).one_or_none()
    if row is None:
        return None
    return row.owner_id, {"job_id": row.id, "name": row.name, "status": row.status, "step": row.step,
                          "max_steps": row.max_steps, "health": row.health, "error": row.error,
                          "parent_id": row.parent_id}


def record_job_event(writer: Writer, job_id: str, event_type: str | None = None,
                     extra: dict[str, Any] | None = None) -> str | None:
    """Record a job's event (by default the one its current status names, e.g. `job.paused` for a paused
    job) with the job's summary as `data` plus `extra`. Call it after the status change, before the commit."""
    found = job_data(writer, job_id)
    if found is None:
        return None
    owner_id, data = found
    event_type = event_type or JOB_STATUS_EVENTS.get(data["status"])
    if event_type is None:  # cancelling: no event of its own, cancelled follows
        return None
    return record_webhook_event(writer, owner_id, event_type, {**data, **(extra or {})})


def worsened_findings(old: Any, new: Any) -> list[dict[str, Any]]:
    """Findings of `new` whose kind is absent from `old` or whose severity is higher there, in `new`'s order.

    `old`/`new` are stored diagnoses ({findings, summary}) or plain finding lists; a finding that stays
    or improves is not a change worth an event, so each worsening is reported once."""
    before = {f.get("kind"): SEVERITY_RANK.get(f.get("severity"), 0) for f in findings_of(old)}
    return [f for f in findings_of(new)
            if f.get("kind") not in before or SEVERITY_RANK.get(f.get("severity"), 0) > before[f.get("kind")]]


def findings_of(diagnosis: Any) -> list[dict[str, Any]]:
    """The finding list of a stored diagnosis ({findings, summary}), or of a list given as is."""
    if isinstance(diagnosis, dict):
        diagnosis = diagnosis.get("findings")
    return [f for f in diagnosis or () if isinstance(f, dict)]


def record_health_changes(writer: Writer, job_id: str, old_diagnosis: Any, new_diagnosis: Any) -> int:
    """One `job.health_changed` per finding that appeared or got worse; returns how many were recorded."""
    worse = worsened_findings(old_diagnosis, new_diagnosis)
    for finding in worse:
        record_job_event(writer, job_id, "job.health_changed", {"finding": finding})
    return len(worse)

