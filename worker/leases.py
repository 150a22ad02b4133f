"""Job ownership: fair atomic claim, lease heartbeat, fenced writes and the final state write.

A claim gives the job a fresh `lease_token`; the worker holds the job while the row
carries its token. Every worker write (metrics, checkpoints, events, status) runs
in a transaction that first locks the job row *with that token* (`hold`), so a
worker that lost its lease, however late its retried writes arrive, writes
nothing once another worker has claimed the job. Lease times are the database's
clock (`db_now`), never a host's.

`attempts` counts starts that did not end in a graceful hand-back: a claim adds
one, `release_job` (warm shutdown) and `pause_held_job` (pause) take it back, a crash keeps it.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, event, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import aliased

from app.models import Event, Job
from app.models.clock import db_now
from app.services.webhook_events import record_health_changes, record_job_event
from worker.db import utcnow
from worker.logs import log_context

log = logging.getLogger(__name__)

OWNED_STATUSES = ("running", "pausing", "cancelling")
CLAIM_TRIES = 5  # fair picks lost to other workers before giving up on this message


@dataclass(frozen=True)
class Lease:
    """What a claim hands its worker: the job and the token every later write must match."""

    job_id: str
    token: str
    worker_id: str


def bound_idle_transactions(engine: Engine, seconds: float) -> None:
    """PostgreSQL ends a session left idle inside a transaction for `seconds` (a worker frozen mid-write).

    `hold` keeps the job row locked until its transaction ends; without this bound, a worker
    paused inside one (SIGSTOP, a suspended VM) would block the job's takeover, and the
    reconciler pass that requeues it, until it woke. Its write then fails and is fenced on retry.
    """
    if engine.dialect.name != "postgresql":
        return  # SQLite: writers wait busy_timeout for the lock, then the pass is retried

    @event.listens_for(engine, "connect")
    def _bound(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET idle_in_transaction_session_timeout = {int(seconds * 1000)}")
        cursor.close()


def claim_job(engine: Engine, job_id: str, worker_id: str, lease_s: float) -> Lease | None:
    """Take a queued job, or a running one whose lease expired (a crash); None when that is not possible."""
    token = secrets.token_hex(16)
    claimable = or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < db_now()))
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            status="running",
            worker_id=worker_id,
            lease_token=token,
            lease_expires_at=db_now(lease_s),
            claimed_at=db_now(),
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
    )
    with engine.begin() as conn:
        won = conn.execute(stmt).rowcount == 1
        if won:
            record_job_event(conn, job_id, "job.running")
    return Lease(job_id, token, worker_id) if won else None


def next_fair_job(conn: Connection) -> str | None:
    """The queued job to run next: the oldest one of the key whose last claim is the oldest (never first)."""
    served = aliased(Job)
    last_claim = select(func.max(served.claimed_at)).where(served.owner_id == Job.owner_id).scalar_subquery()
    never_served_first = case((last_claim.is_(None), 0), else_=1)
    stmt = (select(Job.id).where(Job.status == "queued")
            .order_by(never_served_first, last_claim, Job.created_at, Job.id).limit(1))
    return conn.execute(stmt).scalar_one_or_none()


def claim_next_job(engine: Engine, worker_id: str, lease_s: float) -> Lease | None:
    """Claim the fair next queued job (see `next_fair_job`); None when nothing is queued."""
    for _ in range(CLAIM_TRIES):
        with engine.connect() as conn:
            job_id = next_fair_job(conn)
        if job_id is None:
            return None
        lease = claim_job(engine, job_id, worker_id, lease_s)
        if lease is not None:
            return lease
    return None  # every pick went to another worker: they are busy with it, this message is spent


def hold(conn: Connection, lease: Lease) -> bool:
    """Lock the job row for this transaction if `lease` still holds it; False when it does not.

    A no-op UPDATE rather than a SELECT: it takes the row lock (PostgreSQL) or the write lock
    (SQLite) at once, so a takeover cannot commit between this check and the writes after it.
    """
    stmt = (update(Job)
            .where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.status.in_(OWNED_STATUSES))
            .values(lease_token=Job.lease_token, updated_at=Job.updated_at))
    return conn.execute(stmt).rowcount == 1


def still_held(engine: Engine, lease: Lease) -> bool:
    """True while the job carries our token (a read: for decisions outside the database, like files)."""
    with engine.connect() as conn:
        return conn.execute(select(Job.id).where(Job.id == lease.job_id, Job.lease_token == lease.token,
                                                 Job.status.in_(OWNED_STATUSES))).first() is not None


def renew_lease(engine: Engine, lease: Lease, lease_s: float) -> tuple[bool, bool, bool]:
    """Extend our lease by `lease_s` from the database's now; returns (still_owned, cancel_requested,
    pause_requested)."""
    with engine.begin() as conn:
        owned = conn.execute(
            update(Job)
            .where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.status.in_(OWNED_STATUSES))
            # updated_at stays: a lease renewal is not a change a client can see
            .values(lease_expires_at=db_now(lease_s), updated_at=Job.updated_at)
        ).rowcount == 1
        row = conn.execute(select(Job.cancel_requested, Job.status).where(Job.id == lease.job_id)).one_or_none()
    cancel = row is not None and (bool(row.cancel_requested) or row.status in ("cancelling", "cancelled"))
    return owned, cancel, row is not None and row.status == "pausing"


def insert_event(conn: Connection, job_id: str, kind: str, message: str, step: int | None = None,
                 data: dict[str, Any] | None = None) -> None:
    """Append one event inside the caller's transaction."""
    conn.execute(Event.__table__.insert().values(
        job_id=job_id, step=step, kind=kind, message=message, data=data, created_at=utcnow()))


def add_event(engine: Engine, lease: Lease, kind: str, message: str, step: int | None = None) -> bool:
    """Append one event written by the worker itself (not the engine), if we still hold the job."""
    with engine.begin() as conn:
        if not hold(conn, lease):
            return False
        insert_event(conn, lease.job_id, kind, message, step)
        return True


def finish_job(engine: Engine, lease: Lease, status: str, error: str | None = None, diagnosis: Any = None,
               event: tuple[str, str] | None = None, health: str | None = None) -> bool:
    """Write the final state (and its `event`, (kind, message)) if we still hold the job; False otherwise."""
    now = utcnow()
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": now, "lease_expires_at": None,
                              "lease_token": None, "updated_at": now}
    if diagnosis is not None:
        values["diagnosis"] = diagnosis
    if health is not None:  # the health the diagnosis implies (worker.reporting.diagnosis_values)
        values["health"] = health
    stmt = update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token,
                             Job.status.in_(OWNED_STATUSES))
    with engine.begin() as conn:
        old_diagnosis = conn.execute(select(Job.diagnosis).where(Job.id == lease.job_id)).scalar_one_or_none()
        if conn.execute(stmt.values(**values)).rowcount != 1:
            return False
        if event is not None:
            insert_event(conn, lease.job_id, event[0], event[1])
        if diagnosis is not None:
            record_health_changes(conn, lease.job_id, old_diagnosis, diagnosis)
        record_job_event(conn, lease.job_id)  # job.succeeded, job.failed or job.cancelled
        return True


def release_job(engine: Engine, lease: Lease, message: str, step: int | None = None) -> bool:
    """Hand a running job back to the queue gracefully (shutdown, pause): it resumes elsewhere.

    The start it ends does not count as an attempt (only crashes do), and `enqueued_at` is
    cleared so the relay sends the job again at once.
    """
    stmt = (
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.status == "running")
        .values(status="queued", worker_id=None, lease_token=None, lease_expires_at=None, enqueued_at=None,
                attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0), updated_at=utcnow())
    )
    with engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:
            return False
        insert_event(conn, lease.job_id, "requeued", message, step)
        record_job_event(conn, lease.job_id, "job.queued")
        return True


def pause_held_job(engine: Engine, lease: Lease, step: int | None = None, message: str | None = None,
                   diagnosis: Any = None, health: str | None = None) -> bool:
    """pausing -> paused, once the run stopped at a checkpoint: the worker lets go of the job and is free.

    Like a warm shutdown, the start does not count as an attempt. Nothing is sent: the job waits for
    POST /v1/jobs/{id}/resume, which queues it again. `message` adds a `paused` event (the engine
    writes its own when it stopped for the pause). False when we no longer hold a pausing job (a
    cancel came first: the job is `cancelling`; or the lease is gone).
    """
    now = utcnow()
    values: dict[str, Any] = {"status": "paused", "paused_at": now, "worker_id": None, "lease_token": None,
                              "lease_expires_at": None, "enqueued_at": None, "updated_at": now,
                              "attempts": case((Job.attempts > 0, Job.attempts - 1), else_=0)}
    if diagnosis is not None:
        values["diagnosis"] = diagnosis
    if health is not None:
        values["health"] = health
    stmt = (update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.status == "pausing")
            .values(**values))
    with engine.begin() as conn:
        if conn.execute(stmt).rowcount != 1:
            return False
        if message is not None:
            insert_event(conn, lease.job_id, "paused", message, step)
        record_job_event(conn, lease.job_id, "job.paused")
        return True


class Heartbeat:
    """Daemon thread that renews the lease and mirrors cancel and pause requests into memory."""

    def __init__(self, engine: Engine, lease: Lease, lease_s: float, every_s: float) -> None:
        self.engine, self.lease = engine, lease
        self.lease_s, self.every_s = lease_s, every_s
        self.cancel = threading.Event()
        self.pause = threading.Event()  # the job is `pausing`: checkpoint at the next step and hand it back
        # set by the heartbeat, or by a fenced write that found the job taken over
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)

    def beat(self) -> None:
        """Renew once; a database hiccup is logged and retried at the next beat."""
        try:
            owned, cancel, pause = renew_lease(self.engine, self.lease, self.lease_s)
        except DBAPIError as exc:
            log.warning("heartbeat for %s failed: %s", self.lease.job_id, exc.orig)
            return
        if cancel:
            self.cancel.set()
        if pause:
            self.pause.set()
        if not owned:
            log.warning("lost the lease of %s; stopping without writing its final state", self.lease.job_id)
            self.lost.set()

    def _run(self) -> None:
        with log_context(job_id=self.lease.job_id):  # a new thread starts with no log context
            while not self._stop.wait(self.every_s):
                self.beat()
