"""Claim, lease and final-state semantics on a real database."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update

from app.models import Job
from tests.worker.jobfactory import make_job
from worker.db import utcnow
from worker.leases import Heartbeat, claim_job, finish_job, release_job, renew_lease


def job_row(engine: Engine, job_id: str):
    with engine.connect() as conn:
        return conn.execute(select(Job).where(Job.id == job_id)).one()


def test_two_claims_of_one_job_exactly_one_wins(engine: Engine) -> None:
    job_id = make_job(engine)
    assert claim_job(engine, job_id, "w1", lease_s=30)
    assert not claim_job(engine, job_id, "w2", lease_s=30)
    row = job_row(engine, job_id)
    assert (row.status, row.worker_id, row.attempts) == ("running", "w1", 1)
    assert row.started_at is not None and row.lease_expires_at > utcnow()


def test_concurrent_claims_exactly_one_wins(engine: Engine) -> None:
    job_id = make_job(engine)
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def claim(name: str) -> None:
        barrier.wait()
        results.append(claim_job(engine, job_id, name, lease_s=30))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert job_row(engine, job_id).attempts == 1


def test_expired_lease_can_be_reclaimed_keeping_started_at(engine: Engine) -> None:
    job_id = make_job(engine)
    t0 = utcnow()
    assert claim_job(engine, job_id, "w1", lease_s=30, now=t0)
    first_start = job_row(engine, job_id).started_at
    assert not claim_job(engine, job_id, "w2", lease_s=30, now=t0 + timedelta(seconds=29))
    assert claim_job(engine, job_id, "w2", lease_s=30, now=t0 + timedelta(seconds=31))
    row = job_row(engine, job_id)
    assert (row.worker_id, row.attempts, row.started_at) == ("w2", 2, first_start)


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled", "cancelling"])
def test_finished_or_cancelling_jobs_are_not_claimable(engine: Engine, status: str) -> None:
    job_id = make_job(engine, status=status, lease_expires_at=utcnow() - timedelta(hours=1))
    assert not claim_job(engine, job_id, "w1", lease_s=30)
    assert job_row(engine, job_id).status == status


def test_renew_extends_lease_and_reports_cancel(engine: Engine) -> None:
    job_id = make_job(engine)
    claim_job(engine, job_id, "w1", lease_s=1)
    before = job_row(engine, job_id).lease_expires_at
    assert renew_lease(engine, job_id, "w1", lease_s=60) == (True, False)
    assert job_row(engine, job_id).lease_expires_at > before + timedelta(seconds=50)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status="cancelling", cancel_requested=True))
    assert renew_lease(engine, job_id, "w1", lease_s=60) == (True, True)
    assert renew_lease(engine, job_id, "someone-else", lease_s=60) == (False, True)


def test_heartbeat_sees_cancel_and_lost_lease(engine: Engine) -> None:
    from worker.testing import wait_for

    job_id = make_job(engine)
    claim_job(engine, job_id, "w1", lease_s=30)
    with Heartbeat(engine, job_id, "w1", lease_s=30, every_s=0.02) as hb:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        wait_for(hb.cancel.is_set, 10, "the heartbeat to see cancel_requested")
        assert not hb.lost.is_set()
        with engine.begin() as conn:  # another worker took the job over
            conn.execute(update(Job).where(Job.id == job_id).values(worker_id="w2"))
        wait_for(hb.lost.is_set, 10, "the heartbeat to notice the lost lease")


def test_final_state_needs_ownership(engine: Engine) -> None:
    job_id = make_job(engine)
    claim_job(engine, job_id, "w1", lease_s=30)
    assert not finish_job(engine, job_id, "w2", "succeeded")
    assert finish_job(engine, job_id, "w1", "failed", error="boom", diagnosis={"findings": [], "summary": "x"})
    row = job_row(engine, job_id)
    assert (row.status, row.error, row.lease_expires_at) == ("failed", "boom", None)
    assert row.finished_at is not None and row.diagnosis == {"findings": [], "summary": "x"}
    assert not finish_job(engine, job_id, "w1", "succeeded")  # already final


def test_release_puts_job_back_in_queue(engine: Engine) -> None:
    job_id = make_job(engine)
    claim_job(engine, job_id, "w1", lease_s=30)
    assert release_job(engine, job_id, "w1")
    row = job_row(engine, job_id)
    assert (row.status, row.worker_id, row.enqueued_at, row.attempts) == ("queued", None, None, 1)
    assert claim_job(engine, job_id, "w2", lease_s=30)
