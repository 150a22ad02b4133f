"""Claim, lease and final-state semantics on a real database: tokens, the database clock, fairness."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from app.models import Checkpoint, Event, Job, LayerMetric, StepMetric
from app.models.clock import db_now
from tests.worker.jobfactory import make_job
from worker.db import utcnow
from worker.leases import (
    Heartbeat,
    Lease,
    add_event,
    bound_idle_transactions,
    claim_job,
    claim_next_job,
    finish_job,
    hold,
    release_job,
    renew_lease,
)
from worker.reconciler import reconcile
from worker.reporting import DbReporter
from worker.testing import wait_for


def job_row(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Job).where(Job.id == job_id)).one()


def database_now(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(db_now())).scalar_one()


def expire_lease(engine: Engine, job_id: str) -> None:
    """The worker holding the job stopped renewing (frozen, partitioned or dead) long enough."""
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_now(-1)))


def no_send(task: str, record_id: str, queue: str) -> None:
    pass


def test_two_claims_of_one_job_exactly_one_wins(engine: Engine) -> None:
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "w1", lease_s=30)
    assert lease is not None and lease.job_id == job_id and len(lease.token) == 32
    assert claim_job(engine, job_id, "w2", lease_s=30) is None
    row = job_row(engine, job_id)
    assert (row.status, row.worker_id, row.attempts, row.lease_token) == ("running", "w1", 1, lease.token)
    assert row.started_at is not None and row.claimed_at is not None


def test_concurrent_claims_exactly_one_wins(engine: Engine) -> None:
    job_id = make_job(engine)
    barrier = threading.Barrier(4)
    results: list[Lease | None] = []

    def claim(name: str) -> None:
        barrier.wait()
        results.append(claim_job(engine, job_id, name, lease_s=30))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert job_row(engine, job_id).attempts == 1


def test_expired_lease_can_be_reclaimed_keeping_started_at(engine: Engine) -> None:
    job_id = make_job(engine)
    first = claim_job(engine, job_id, "w1", lease_s=30)
    first_start = job_row(engine, job_id).started_at
    assert claim_job(engine, job_id, "w2", lease_s=30) is None  # live lease
    expire_lease(engine, job_id)
    second = claim_job(engine, job_id, "w2", lease_s=30)
    assert second is not None and first is not None and second.token != first.token
    row = job_row(engine, job_id)
    assert (row.worker_id, row.attempts, row.started_at, row.lease_token) == ("w2", 2, first_start, second.token)


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled", "cancelling"])
def test_finished_or_cancelling_jobs_are_not_claimable(engine: Engine, status: str) -> None:
    job_id = make_job(engine, status=status, lease_expires_at=utcnow() - timedelta(hours=1))
    assert claim_job(engine, job_id, "w1", lease_s=30) is None
    assert job_row(engine, job_id).status == status


def test_lease_times_are_the_databases_clock(engine: Engine) -> None:
    """Claims and renewals set `lease_expires_at` from the database's now, whatever the host's clock says."""
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "w1", lease_s=1)
    assert lease is not None
    before = database_now(engine)
    assert renew_lease(engine, lease, lease_s=60) == (True, False, False)
    after = database_now(engine)
    expires = job_row(engine, job_id).lease_expires_at
    assert before + timedelta(seconds=60) <= expires + timedelta(milliseconds=1)
    assert expires <= after + timedelta(seconds=60, milliseconds=1)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status="cancelling", cancel_requested=True))
    assert renew_lease(engine, lease, lease_s=60) == (True, True, False)
    assert renew_lease(engine, Lease(job_id, "not-the-token", "w1"), lease_s=60) == (False, True, False)


def test_a_reconciler_with_a_skewed_host_clock_judges_leases_by_the_database(engine: Engine) -> None:
    live = make_job(engine)
    dead = make_job(engine)
    assert claim_job(engine, live, "w1", lease_s=30) and claim_job(engine, dead, "w2", lease_s=30)
    expire_lease(engine, dead)
    # a host an hour ahead must not take the live job; one an hour behind must still requeue the dead one
    for skew in (timedelta(hours=1), -timedelta(hours=1)):
        reconcile(utcnow() + skew, engine=engine, send=no_send)
    assert job_row(engine, live).status == "running"
    dead_row = job_row(engine, dead)
    assert (dead_row.status, dead_row.lease_token, dead_row.worker_id) == ("queued", None, None)


def test_heartbeat_sees_cancel_and_lost_lease(engine: Engine) -> None:
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "w1", lease_s=30)
    assert lease is not None
    with Heartbeat(engine, lease, lease_s=30, every_s=0.02) as hb:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        wait_for(hb.cancel.is_set, 10, "the heartbeat to see cancel_requested")
        assert not hb.lost.is_set()
        expire_lease(engine, job_id)
        assert claim_job(engine, job_id, "w2", lease_s=30)  # another worker took the job over
        wait_for(hb.lost.is_set, 10, "the heartbeat to notice the lost lease")


def test_final_state_needs_the_token(engine: Engine) -> None:
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "w1", lease_s=30)
    assert lease is not None
    assert not finish_job(engine, Lease(job_id, "stale", "w1"), "succeeded")
    assert finish_job(engine, lease, "failed", error="boom", diagnosis={"findings": [], "summary": "x"},
                      event=("failed", "boom"))
    row = job_row(engine, job_id)
    assert (row.status, row.error, row.lease_expires_at, row.lease_token) == ("failed", "boom", None, None)
    assert row.finished_at is not None and row.diagnosis == {"findings": [], "summary": "x"}
    assert not finish_job(engine, lease, "succeeded")  # already final
    assert not add_event(engine, lease, "late", "after the end")
    with engine.connect() as conn:
        assert list(conn.execute(select(Event.kind).where(Event.job_id == job_id)).scalars()) == ["failed"]


def test_graceful_releases_do_not_count_as_attempts_but_a_crash_does(engine: Engine) -> None:
    """Four deploys (warm shutdowns) and one crash: the job is on its second attempt, not failed."""
    job_id = make_job(engine)
    for _ in range(4):
        lease = claim_job(engine, job_id, "w1", lease_s=30)
        assert lease is not None and release_job(engine, lease, "worker shutting down")
        row = job_row(engine, job_id)
        assert (row.status, row.worker_id, row.enqueued_at, row.lease_token, row.attempts) == (
            "queued", None, None, None, 0)
    assert claim_job(engine, job_id, "w1", lease_s=30)
    assert job_row(engine, job_id).attempts == 1
    expire_lease(engine, job_id)  # the worker crashed
    assert reconcile(utcnow(), engine=engine, send=no_send, max_attempts=2).requeued == 1
    assert (job_row(engine, job_id).status, job_row(engine, job_id).attempts) == ("queued", 1)
    assert claim_job(engine, job_id, "w2", lease_s=30)
    assert job_row(engine, job_id).attempts == 2
    expire_lease(engine, job_id)  # and crashed again: max_attempts=2 reached
    reconcile(utcnow(), engine=engine, send=no_send, max_attempts=2)
    row = job_row(engine, job_id)
    assert row.status == "failed" and "died 2 times" in row.error
    with engine.connect() as conn:
        kinds = list(conn.execute(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)).scalars())
    assert kinds == ["requeued"] * 5 + ["failed"]


def counts(engine: Engine, job_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        return {model.__name__: conn.execute(select(func.count()).select_from(model)
                                             .where(model.job_id == job_id)).scalar_one()
                for model in (StepMetric, LayerMetric, Checkpoint, Event)}


def test_a_worker_that_wakes_after_a_takeover_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    """Its in-memory fence never tripped (it was frozen); the database refuses every write by its old token."""
    job_id = make_job(engine)
    old = claim_job(engine, job_id, "old", lease_s=30)
    assert old is not None
    lost: list[bool] = []
    stale = DbReporter(engine, job_id, lease=old, on_lease_lost=lambda: lost.append(True))
    stale.on_metrics([{"step": 1, "loss": 2.0, "tokens_seen": 64}])  # written while it held the job
    expire_lease(engine, job_id)
    new = claim_job(engine, job_id, "new", lease_s=30)
    assert new is not None
    DbReporter(engine, job_id, lease=new).on_metrics([{"step": 1, "loss": 1.5, "tokens_seen": 64}])
    before, row_before = counts(engine, job_id), job_row(engine, job_id)

    # the old worker wakes up and goes on where it was
    ckpt = tmp_path / "step_5.pt"
    ckpt.write_bytes(b"old")
    stale.on_metrics([{"step": s, "loss": 9.0, "tokens_seen": 64 * s, "health": "critical"} for s in range(1, 6)])
    stale.on_layer_stats(5, [{"layer": "w", "grad_norm": 1.0, "weight_norm": 1.0, "update_ratio": 0.1}])
    stale.on_event({"step": 5, "kind": "nonfinite", "message": "late"})
    stale.on_checkpoint({"step": 5, "path": str(ckpt), "bytes": 3, "sha256": "ab" * 32})
    stale.on_checkpoint_removed({"step": 1})
    stale.on_diagnosis([{"kind": "late"}], "late")
    assert not stale.may_write_checkpoints()
    assert not add_event(engine, old, "failed", "late")
    assert not release_job(engine, old, "late shutdown")
    assert not finish_job(engine, old, "failed", error="late")

    assert counts(engine, job_id) == before and lost
    row = job_row(engine, job_id)
    assert (row.status, row.worker_id, row.lease_token, row.step, row.health, row.diagnosis, row.updated_at) == (
        "running", "new", new.token, 1, row_before.health, None, row_before.updated_at)
    with engine.connect() as conn:
        assert conn.execute(select(StepMetric.loss).where(StepMetric.job_id == job_id)).scalars().all() == [1.5]


def test_the_next_job_goes_round_robin_across_keys(engine: Engine) -> None:
    """Key A queues 5 jobs, then key B one: one worker runs A's first, then B's, then A's others in order."""
    a_jobs = [make_job(engine)]
    with engine.connect() as conn:
        owner_a = conn.execute(select(Job.owner_id).where(Job.id == a_jobs[0])).scalar_one()
    a_jobs += [make_job(engine) for _ in range(4)]
    with engine.begin() as conn:  # make_job gives each job its own key: move four onto key A
        conn.execute(update(Job).where(Job.id.in_(a_jobs)).values(owner_id=owner_a))
    b_job = make_job(engine)
    order = []
    for _ in range(6):
        lease = claim_next_job(engine, "w1", lease_s=30)
        assert lease is not None
        order.append(lease.job_id)
        assert finish_job(engine, lease, "succeeded")
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]
    assert claim_next_job(engine, "w1", lease_s=30) is None


def test_a_stale_message_claims_the_fair_next_job_or_nothing(engine: Engine, settings: Any) -> None:
    from worker.service import run_train_job

    done = make_job(engine, status="succeeded")
    assert run_train_job(engine, done, settings) == "skipped"  # nothing queued: a no-op
    assert job_row(engine, done).status == "succeeded"


def test_a_session_idle_inside_a_transaction_is_ended_on_postgresql(engine: Engine) -> None:
    """A worker frozen mid-write must not hold the job row's lock (and block its takeover) for ever."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no server sessions")
    worker_engine = create_engine(engine.url, poolclass=NullPool)
    bound_idle_transactions(worker_engine, 0.5)
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "frozen", lease_s=30)
    assert lease is not None
    frozen = worker_engine.connect()
    try:
        frozen.begin()
        assert frozen.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one() == "500ms"
        assert hold(frozen, lease)  # the job row is locked; then the worker freezes
        with engine.begin() as conn:  # waits until the server ends the frozen session (fails after 5 s)
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            conn.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_now(-1)))
        assert claim_job(engine, job_id, "taker", lease_s=30) is not None
    finally:
        try:
            frozen.close()
        except DBAPIError:  # the server already ended it
            pass
        worker_engine.dispose()
