"""Reconciler and relay: accepted work is never lost, and never waits, whatever the broker or a worker did.

The relay (`relay`, every second in each worker) is the outbox's sender:

- queued jobs, samples and probes without a live message (`enqueued_at` null: the API's publish
  failed, a job was handed back or requeued) are sent;
- when the broker restarted since a record was sent (Redis `uptime_in_seconds`), the record
  is sent again: a broker restarted without its data lost the message.

The reconciler (`reconcile`, every few seconds in each worker):

- running jobs whose lease expired (worker died) go back to queued (the relay re-sends them);
- cancelling jobs whose lease expired are cancelled (no worker is left to stop them);
- pausing jobs whose lease expired are paused (they resume from their newest checkpoint);
- queued jobs waiting longer than this worker has been idle are re-sent (their message is
  lost, or this idle worker would have received it), and any queued record after `resend_after_s`;
- running samples and LR probes that outlived their timeout fail (their worker died, or hangs),
  and queued ones sent more than `resend_after_s` ago are re-sent.

Lease expiry is compared with the database's clock. Every change is a conditional
UPDATE checked by rowcount, so any number of reconcilers may run at once; a duplicate
message is harmless (a train message only says "work available"; the claim is atomic).

Run once: `python -m worker.reconciler --once`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, or_, select, update

from app.models import Event, Job, Probe, Sample
from app.models.clock import db_now
from app.services.queue import PROBE_TASK, SAMPLE_QUEUE, SAMPLE_TASK, TRAIN_QUEUE, TRAIN_TASK
from app.services.webhook_events import record_job_event

log = logging.getLogger(__name__)

BATCH = 100  # rows looked at per kind and pass; the next pass picks up the rest

Send = Callable[[str, str, str], None]  # (task name, record id, queue)


@dataclass
class ReconcileReport:
    """What one pass changed."""

    resent: int = 0
    idle_resent: int = 0
    requeued: int = 0
    cancelled: int = 0
    paused: int = 0
    samples_resent: int = 0
    samples_failed: int = 0
    probes_resent: int = 0
    probes_failed: int = 0


def requeue_expired(engine: Engine, now: datetime, max_attempts: int = 5) -> list[str]:
    """Running jobs whose lease expired -> queued (attempts kept); returns their ids.

    A job whose workers died `max_attempts` times is failed instead: something in it
    (memory, a driver crash) kills the worker, and requeueing it would take the next one down too.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.attempts).where(Job.status == "running", Job.lease_expires_at < db_now()).limit(BATCH)
        ).all()
    done = []
    for job_id, attempts in rows:
        expired = (Job.id == job_id, Job.status == "running", Job.lease_expires_at < db_now())
        if attempts >= max_attempts:
            error = (f"the worker running this job died {attempts} times (its lease expired each time); "
                     "it may run out of memory: lower model size, batch_size or seq_len")
            values: dict[str, object] = {"status": "failed", "error": error, "finished_at": now}
            kind, message = "failed", error
        else:
            values = {"status": "queued", "enqueued_at": None}
            kind, message = "requeued", "worker lease expired; the job resumes from its checkpoint"
        with engine.begin() as conn:
            changed = conn.execute(
                update(Job).where(*expired)
                .values(worker_id=None, lease_token=None, lease_expires_at=None, updated_at=now, **values)
            ).rowcount
            if changed:
                conn.execute(Event.__table__.insert().values(
                    job_id=job_id, kind=kind, message=message, data=None, created_at=now))
                # job.failed, or job.queued: the job waits for a worker again (a consumer tracking its state
                # sees queued -> running -> queued -> running, not running twice)
                record_job_event(conn, job_id)
                if kind == "requeued":
                    done.append(job_id)
    return done


def cancel_orphaned(engine: Engine, now: datetime) -> int:
    """Cancelling jobs whose worker is gone (lease expired) -> cancelled."""
    with engine.begin() as conn:
        cancelled = conn.execute(
            update(Job)
            .where(Job.status == "cancelling", Job.lease_expires_at < db_now())
            .values(status="cancelled", lease_token=None, lease_expires_at=None, finished_at=now, updated_at=now)
            .returning(Job.id)
        ).scalars().all()
        for job_id in cancelled:
            record_job_event(conn, job_id, "job.cancelled")
    return len(cancelled)


def pause_orphaned(engine: Engine, now: datetime) -> list[str]:
    """Pausing jobs whose worker is gone (lease expired) -> paused; returns their ids.

    The worker died before its pause checkpoint, so the crash keeps its attempt; a resume continues
    from the newest checkpoint it did write. Nothing is sent: a paused job waits for a resume."""
    with engine.connect() as conn:
        ids = conn.execute(select(Job.id).where(Job.status == "pausing", Job.lease_expires_at < db_now())
                           .limit(BATCH)).scalars().all()
    done = []
    for job_id in ids:
        with engine.begin() as conn:
            changed = conn.execute(
                update(Job).where(Job.id == job_id, Job.status == "pausing", Job.lease_expires_at < db_now())
                .values(status="paused", paused_at=now, worker_id=None, lease_token=None, lease_expires_at=None,
                        enqueued_at=None, updated_at=now)
            ).rowcount
            if changed:
                conn.execute(Event.__table__.insert().values(
                    job_id=job_id, kind="paused", data=None, created_at=now,
                    message="worker lease expired while pausing; the job resumes from its newest checkpoint"))
                record_job_event(conn, job_id, "job.paused")
                done.append(job_id)
    return done


# updated_at stays: (re-)sending is bookkeeping, not a change a client can see
KEEP = {Job: {"updated_at": Job.updated_at}, Sample: {}, Probe: {}}
KINDS = ((Job, TRAIN_TASK, TRAIN_QUEUE), (Sample, SAMPLE_TASK, SAMPLE_QUEUE), (Probe, PROBE_TASK, SAMPLE_QUEUE))


def resend_queued(engine: Engine, now: datetime, resend_after_s: float, send: Send) -> int:
    """Re-send queued jobs never enqueued or enqueued before the cutoff."""
    return resend_stale(engine, now, resend_after_s, send, Job, TRAIN_TASK, TRAIN_QUEUE)


def send_unsent(engine: Engine, now: datetime, send: Send) -> int:
    """The outbox: send every queued job, sample and probe that has no message (`enqueued_at` null)."""
    return sum(resend_stale(engine, now, None, send, model, task, queue) for model, task, queue in KINDS)


def forget_sends_before(engine: Engine, broker_started_at: datetime) -> int:
    """Mark records sent before the broker (re)started as unsent: a broker restarted empty lost them.

    Idempotent across workers: a record the relay re-sent since carries a newer stamp.
    """
    forgotten = 0
    with engine.begin() as conn:
        for model, _, _ in KINDS:
            forgotten += conn.execute(
                update(model).where(model.status == "queued", model.enqueued_at < broker_started_at)
                .values(enqueued_at=None, **KEEP[model])
            ).rowcount
    if forgotten:
        log.warning("the broker restarted at %s: re-sending %d queued records sent before", broker_started_at,
                    forgotten)
    return forgotten


def relay(now: datetime, *, engine: Engine, send: Send, broker_started_at: datetime | None = None) -> int:
    """One relay pass: forget messages sent to a broker that restarted since, then send what has none."""
    if broker_started_at is not None:
        forget_sends_before(engine, broker_started_at)
    return send_unsent(engine, now, send)


def resend_stale(engine: Engine, now: datetime, resend_after_s: float | None, send: Send, model: Any,
                 task: str, queue: str) -> int:
    """Send queued records (jobs, samples, probes) never enqueued, or (`resend_after_s`) enqueued before the cutoff.

    The stamp comes first, conditionally, so only one reconciler sends each record per period.
    """
    keep = KEEP[model]
    stale = and_(model.status == "queued", unsent_or_sent_before(model, now, resend_after_s))
    with engine.connect() as conn:
        ids = conn.execute(select(model.id).where(stale).order_by(model.created_at).limit(BATCH)).scalars().all()
    sent = 0
    for record_id in ids:
        with engine.begin() as conn:
            won = conn.execute(update(model).where(model.id == record_id, stale).values(enqueued_at=now, **keep)).rowcount
        if not won:
            continue
        try:
            send(task, record_id, queue)
            sent += 1
        except Exception as exc:  # broker down: clear the stamp so the next pass tries again at once
            log.warning("re-sending %s failed: %s", record_id, exc)
            with engine.begin() as conn:
                conn.execute(update(model).where(model.id == record_id, model.status == "queued",
                                                 model.enqueued_at == now).values(enqueued_at=None, **keep))
            break
    return sent


def unsent_or_sent_before(model: Any, now: datetime, resend_after_s: float | None) -> ColumnElement[bool]:
    """Never sent, or (with `resend_after_s`) last sent more than that long before `now`."""
    if resend_after_s is None:
        return model.enqueued_at.is_(None)
    return or_(model.enqueued_at.is_(None), model.enqueued_at < now - timedelta(seconds=resend_after_s))


def fail_overdue(engine: Engine, model: Any, now: datetime, timeout_s: float, what: str) -> int:
    """Fail running records (samples, probes) started more than `timeout_s` ago: their worker died or hangs,
    and without this a client polling them would wait forever."""
    cutoff = now - timedelta(seconds=timeout_s)
    # rows from before started_at existed count from created_at (plain comparisons keep the column type)
    too_old = or_(model.started_at < cutoff, and_(model.started_at.is_(None), model.created_at < cutoff))
    with engine.begin() as conn:
        return conn.execute(
            update(model)
            .where(model.status == "running", too_old)
            .values(status="failed", error=f"{what} did not finish within {timeout_s:g} s", finished_at=now)
        ).rowcount


# records a client polls until a samples worker finishes them: (model, task, what its timeout error calls it)
POLLED = {"samples": (Sample, SAMPLE_TASK, "sampling"), "probes": (Probe, PROBE_TASK, "the LR probe")}


def reconcile_polled(engine: Engine, kind: str, now: datetime, resend_after_s: float, timeout_s: float,
                     send: Send) -> tuple[int, int]:
    """Re-send stale queued samples or probes; fail running ones whose worker took longer than the timeout.
    Returns (re-sent, failed)."""
    model, task, what = POLLED[kind]
    failed = fail_overdue(engine, model, now, timeout_s, what)
    return resend_stale(engine, now, resend_after_s, send, model, task, SAMPLE_QUEUE), failed


def reconcile(
    now: datetime,
    *,
    engine: Engine,
    send: Send,
    resend_after_s: float = 600.0,
    sample_timeout_s: float = 600.0,
    probe_timeout_s: float = 3600.0,
    max_attempts: int = 5,
    idle_for_s: float = 0.0,
    idle_resend_s: float = 10.0,
) -> ReconcileReport:
    """One pass: requeue expired leases, finish orphaned cancels and pauses, re-send what looks lost.

    `idle_for_s`: how long the calling worker (a consumer of the train queue) has been idle.
    Once that reaches `idle_resend_s`, queued jobs sent more than `idle_resend_s` ago are
    re-sent: had their message been in the queue, this worker would have received it.
    """
    report = ReconcileReport()
    report.requeued = len(requeue_expired(engine, now, max_attempts))
    report.cancelled = cancel_orphaned(engine, now)
    report.paused = len(pause_orphaned(engine, now))
    if idle_for_s >= idle_resend_s:
        report.idle_resent = resend_queued(engine, now, idle_resend_s, send)
    report.resent = resend_queued(engine, now, resend_after_s, send)
    report.samples_resent, report.samples_failed = reconcile_polled(
        engine, "samples", now, resend_after_s, sample_timeout_s, send)
    report.probes_resent, report.probes_failed = reconcile_polled(
        engine, "probes", now, resend_after_s, probe_timeout_s, send)
    if report != ReconcileReport():
        log.info("reconciler: %s", report)
    return report


class ReconcilerThread(threading.Thread):
    """Runs `run_once` (a reconciler or relay pass) every `every_s` seconds until stopped; errors are logged."""

    def __init__(self, run_once: Callable[[], object], every_s: float, name: str = "reconciler") -> None:
        super().__init__(name=name, daemon=True)
        self.run_once, self.every_s = run_once, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.run_once()
            except Exception:  # database or broker down: try again next period
                log.exception("%s pass failed", self.name)

    def stop(self) -> None:
        self.stopped.set()


def main(argv: list[str] | None = None) -> int:
    """CLI: run one pass (--once) or loop."""
    parser = argparse.ArgumentParser(prog="python -m worker.reconciler", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="run one pass and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from worker.celery_app import reconcile_now, settings

    if args.once:
        print(reconcile_now())
        return 0
    thread = ReconcilerThread(reconcile_now, settings.reconcile_every_s)
    thread.start()
    thread.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
