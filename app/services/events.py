"""Events and diagnosis of a job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.extensions import db
from app.models import Event, Job


def list_events(job: Job, after_id: int, limit: int) -> dict[str, Any]:
    """Events with id > after_id in id order; next_after_id when more may follow."""
    rows = list(db.session.execute(
        select(Event).where(Event.job_id == job.id, Event.id > after_id).order_by(Event.id).limit(limit)
    ).scalars())
    next_after = rows[-1].id if len(rows) == limit else None
    return {"items": rows, "next_after_id": next_after}


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
        summary = "no findings yet" if job.status in ("queued", "running", "cancelling") else "no problems found"
    return {"job_id": job.id, "status": job.status, "health": job.health, "findings": findings, "summary": summary}
