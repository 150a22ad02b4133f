"""Job ownership: atomic claim, lease heartbeat, and the final state write.

A worker owns a job while `jobs.worker_id` names it and `lease_expires_at` is in
the future; every write that ends or releases a job is conditional on that
ownership, so a worker that lost its lease can never overwrite the new owner.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError

from app.models import Event, Job
from worker.db import utcnow
from worker.logs import log_context

log = logging.getLogger(__name__)

OWNED_STATUSES = ("running", "cancelling")


def claim_job(engine: Engine, job_id: str, worker_id: str, lease_s: float, now: datetime | None = None) -> bool:
    """Take a queued job, or a running one whose lease expired; False when someone else has it."""
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)),
        )
        .values(
            status="running",
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_s),
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def renew_lease(engine: Engine, job_id: str, worker_id: str, lease_s: float) -> tuple[bool, bool]:
    """Extend our lease; returns (still_owned, cancel_requested)."""
    now = utcnow()
    with engine.begin() as conn:
        owned = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(OWNED_STATUSES))
            # updated_at stays: a lease renewal is not a change a client can see
            .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=Job.updated_at)
        ).rowcount == 1
        row = conn.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    cancel = row is not None and (bool(row.cancel_requested) or row.status in ("cancelling", "cancelled"))
    return owned, cancel


def finish_job(
    engine: Engine,
    job_id: str,
    worker_id: str,
    status: str,
    error: str | None = None,
    diagnosis: Any = None,
    health: str | None = None,
) -> bool:
    """Write the final state if we still own the job; False when the lease was lost."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "error": error,
        "finished_at": now,
        "lease_expires_at": None,
        "updated_at": now,
    }
    if diagnosis is not None:
        values["diagnosis"] = diagnosis
    if health is not None:  # the health the diagnosis implies (worker.reporting.diagnosis_values)
        values["health"] = health
    stmt = update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(OWNED_STATUSES))
    with engine.begin() as conn:
        return conn.execute(stmt.values(**values)).rowcount == 1


def release_job(engine: Engine, job_id: str, worker_id: str) -> bool:
    """Hand a running job back to the queue (worker shutting down); it resumes elsewhere."""
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(status="queued", worker_id=None, lease_expires_at=None, enqueued_at=None, updated_at=now)
    )
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount == 1


def add_event(engine: Engine, job_id: str, kind: str, message: str, step: int | None = None,
              data: dict[str, Any] | None = None) -> None:
    """Append one event written by the worker itself (not the engine)."""
    with engine.begin() as conn:
        conn.execute(
            Event.__table__.insert().values(
                job_id=job_id, step=step, kind=kind, message=message, data=data, created_at=utcnow()
            )
        )


class Heartbeat:
    """Daemon thread that renews the lease and mirrors cancel_requested into memory."""

    def __init__(self, engine: Engine, job_id: str, worker_id: str, lease_s: float, every_s: float) -> None:
        self.engine, self.job_id, self.worker_id = engine, job_id, worker_id
        self.lease_s, self.every_s = lease_s, every_s
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)

    def beat(self) -> None:
        """Renew once; a database hiccup is logged and retried at the next beat."""
        try:
            owned, cancel = renew_lease(self.engine, self.job_id, self.worker_id, self.lease_s)
        except DBAPIError as exc:
            log.warning("heartbeat for %s failed: %s", self.job_id, exc.orig)
            return
        if cancel:
            self.cancel.set()
        if not owned:
            log.warning("lost the lease of %s; stopping without writing its final state", self.job_id)
            self.lost.set()

    def _run(self) -> None:
        with log_context(job_id=self.job_id):  # a new thread starts with no log context
            while not self._stop.wait(self.every_s):
                self.beat()
