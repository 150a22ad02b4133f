"""Reconciler: accepted work is never lost, whatever happened to the broker or a worker.

- queued jobs never enqueued (publish failed) or enqueued long ago (message lost) are re-sent;
- running jobs whose lease expired (worker died) go back to queued and are re-sent;
- cancelling jobs whose lease expired are cancelled (no worker is left to stop them);
- queued samples are re-sent after a while, running samples that outlived their timeout fail.

Every change is a conditional UPDATE checked by rowcount, so any number of
reconcilers may run at once; a duplicate message is harmless (the claim drops it).

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

from sqlalchemy import Engine, and_, or_, select, update

from app.models import Event, Job, Sample
from app.services.queue import SAMPLE_QUEUE, SAMPLE_TASK, TRAIN_QUEUE, TRAIN_TASK

log = logging.getLogger(__name__)

BATCH = 100  # rows looked at per kind and pass; the next pass picks up the rest

Send = Callable[[str, str, str], None]  # (task name, record id, queue)


@dataclass
class ReconcileReport:
    """What one pass changed."""

    resent: int = 0
    requeued: int = 0
    cancelled: int = 0
    samples_resent: int = 0
    samples_failed: int = 0


def requeue_expired(engine: Engine, now: datetime, max_attempts: int = 5) -> list[str]:
    """Running jobs whose lease expired -> queued (attempts kept); returns their ids.

    A job whose workers died `max_attempts` times is failed instead: something in it
    (memory, a driver crash) kills the worker, and requeueing it would take the next one down too.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.attempts).where(Job.status == "running", Job.lease_expires_at < now).limit(BATCH)
        ).all()
    done = []
    for job_id, attempts in rows:
        expired = (Job.id == job_id, Job.status == "running", Job.lease_expires_at < now)
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
                .values(worker_id=None, lease_expires_at=None, updated_at=now, **values)
            ).rowcount
            if changed:
                conn.execute(Event.__table__.insert().values(
                    job_id=job_id, kind=kind, message=message, data=None, created_at=now))
                if kind == "requeued":
                    done.append(job_id)
    return done


def cancel_orphaned(engine: Engine, now: datetime) -> int:
    """Cancelling jobs whose worker is gone (lease expired) -> cancelled."""
    with engine.begin() as conn:
        return conn.execute(
            update(Job)
            .where(Job.status == "cancelling", Job.lease_expires_at < now)
            .values(status="cancelled", lease_expires_at=None, finished_at=now, updated_at=now)
        ).rowcount


def resend_queued(engine: Engine, now: datetime, resend_after_s: float, send: Send) -> int:
    """Re-send queued jobs never enqueued or enqueued before the cutoff."""
    # updated_at stays: re-sending is bookkeeping, not a change a client can see
    return resend_stale(engine, now, resend_after_s, send, Job, TRAIN_TASK, TRAIN_QUEUE,
                        keep={"updated_at": Job.updated_at})


def resend_stale(engine: Engine, now: datetime, resend_after_s: float, send: Send, model: Any,
                 task: str, queue: str, keep: dict[str, Any] | None = None) -> int:
    """Re-send queued records (jobs, samples) never enqueued or enqueued before the cutoff.

    The stamp comes first, conditionally, so only one reconciler sends each record per period.
    """
    keep = keep or {}
    cutoff = now - timedelta(seconds=resend_after_s)
    stale = and_(model.status == "queued", or_(model.enqueued_at.is_(None), model.enqueued_at < cutoff))
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


def reconcile_samples(engine: Engine, now: datetime, resend_after_s: float, timeout_s: float,
                      send: Send) -> tuple[int, int]:
    """Re-send stale queued samples; fail running samples whose worker took longer than the timeout."""
    cutoff = now - timedelta(seconds=timeout_s)
    # rows from before started_at existed count from created_at (plain comparisons keep the column type)
    too_old = or_(Sample.started_at < cutoff, and_(Sample.started_at.is_(None), Sample.created_at < cutoff))
    with engine.begin() as conn:
        failed = conn.execute(
            update(Sample)
            .where(Sample.status == "running", too_old)
            .values(status="failed", error=f"sampling did not finish within {timeout_s:g} s", finished_at=now)
        ).rowcount
    return resend_stale(engine, now, resend_after_s, send, Sample, SAMPLE_TASK, SAMPLE_QUEUE), failed


def reconcile(
    now: datetime,
    *,
    engine: Engine,
    send: Send,
    resend_after_s: float = 600.0,
    sample_timeout_s: float = 600.0,
    max_attempts: int = 5,
) -> ReconcileReport:
    """One pass: requeue expired leases, finish orphaned cancels, re-send what looks lost."""
    report = ReconcileReport()
    report.requeued = len(requeue_expired(engine, now, max_attempts))
    report.cancelled = cancel_orphaned(engine, now)
    report.resent = resend_queued(engine, now, resend_after_s, send)
    report.samples_resent, report.samples_failed = reconcile_samples(
        engine, now, resend_after_s, sample_timeout_s, send
    )
    if report != ReconcileReport():
        log.info("reconciler: %s", report)
    return report


class ReconcilerThread(threading.Thread):
    """Runs `reconcile` every `every_s` seconds until stopped; errors are logged, never fatal."""

    def __init__(self, run_once: Callable[[], object], every_s: float) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.run_once, self.every_s = run_once, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.run_once()
            except Exception:  # database or broker down: try again next period
                log.exception("reconciler pass failed")

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
