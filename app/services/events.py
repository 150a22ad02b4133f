"""Events and diagnosis of a job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.extensions import db
from app.models import UNFINISHED_STATUSES, Event, Job
from app.services import cursors


def list_events(job: Job, after_id: int | None, cursor: str | None, limit: int) -> dict[str, Any]:
    """Events after the cursor's event and with id > after_id (both optional) in id order, the order they happened in
    (several may share a step). next_cursor and next_after_id point after the last one; null at the end."""
    start = max(cursors.decode("events", cursor).number if cursor else 0, after_id or 0)
    rows = list(db.session.execute(
        select(Event).where(Event.job_id == job.id, Event.id > start).order_by(Event.id).limit(limit + 1)
    ).scalars())
    if len(rows) <= limit:
        return {"items": rows, "next_cursor": None, "next_after_id": None}
    rows = rows[:limit]
    last = rows[-1].id
    return {"items": rows, "next_cursor": cursors.encode("events", cursors.RowKey(last)), "next_after_id": last}


def diagnosis_view(job: Job) -> dict[str, Any]:
    """Findings (a list, or {findings, summary} as the worker stores it) plus a one-line summary."""
    raw = job.diagnosis
    findings: list[dict[str, Any]] = []
    summary: str | None = None
    if isinstance(raw, dict):
        findings = list(raw.get("findings") or [])
        summary = raw.get("summary")
    elif isinstance(raw, list):
        findings = raw
    if summary is None and findings:
        summary = "; ".join(str(f.get("summary", f.get("kind", ""))) for f in findings if isinstance(f, dict))
    if summary is None:
        summary = "no findings yet" if job.status in UNFINISHED_STATUSES else "no problems found"
    return {"job_id": job.id, "status": job.status, "health": job.health, "findings": findings, "summary": summary}
