"""Pause on the worker side: the run checkpoints, the job becomes paused, the worker is free; resume matches
an uninterrupted run. Real engine, real databases (SQLite and PostgreSQL), no Celery."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sqlalchemy import Engine, select, update

from app.models import Event, Job
from tests.worker.jobfactory import make_job
from tests.worker.test_worker_claims import expire_lease, job_row
from tests.worker.test_worker_service import checkpoints, event_kinds, run_in_thread, spec_with, steps
from worker import service
from worker.artifacts import local_checkpoint_dir
from worker.db import utcnow
from worker.engine.checkpoint import checkpoint_path, load_checkpoint
from worker.leases import Heartbeat, claim_job, pause_held_job
from worker.reconciler import reconcile, send_unsent
from worker.service import run_train_job
from worker.settings import WorkerSettings
from worker.testing import wait_for

MAX_STEPS = 300


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def request_pause(engine: Engine, job_id: str) -> None:
    """What POST /v1/jobs/{id}/pause does to a running job."""
    with engine.begin() as conn:
        assert conn.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                            .values(status="pausing")).rowcount == 1


def requeue(engine: Engine, job_id: str) -> None:
    """What POST /v1/jobs/{id}/resume does to a paused job (without the publish)."""
    with engine.begin() as conn:
        assert conn.execute(update(Job).where(Job.id == job_id, Job.status == "paused")
                            .values(status="queued", paused_at=None)).rowcount == 1


def final_model(settings: WorkerSettings, job_id: str, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(local_checkpoint_dir(settings.storage, job_id), step))["model"]


def test_pause_frees_the_worker_and_resume_ends_with_the_weights_of_an_uninterrupted_run(
        engine: Engine, settings: WorkerSettings) -> None:
    spec = spec_with(max_steps=MAX_STEPS)
    straight = make_job(engine, settings.storage_dir, spec=spec)
    assert run_train_job(engine, straight, settings) == "succeeded"

    job_id = make_job(engine, settings.storage_dir, spec=spec)
    thread, result = run_in_thread(engine, job_id, settings)
    wait_for(lambda: job_row(engine, job_id).step > 0, 60, "the first metrics")
    request_pause(engine, job_id)
    thread.join(timeout=60)
    assert result == ["paused"]
    row = job_row(engine, job_id)
    paused_at = row.step
    assert 0 < paused_at < MAX_STEPS, "the pause must land before the end for this test to mean anything"
    assert (row.status, row.worker_id, row.lease_token, row.lease_expires_at, row.enqueued_at, row.attempts) == (
        "paused", None, None, None, None, 0)  # a pause is no crash attempt
    assert row.paused_at is not None and row.finished_at is None
    assert checkpoints(engine, job_id)[-1].step == paused_at
    assert event_kinds(engine, job_id)[-1] == "paused"
    # nothing claims a paused job, and the relay does not send it
    assert run_train_job(engine, job_id, settings) == "skipped"
    assert send_unsent(engine, utcnow(), lambda *a: pytest.fail(f"sent {a}")) == 0

    requeue(engine, job_id)
    assert run_train_job(engine, job_id, settings) == "succeeded"
    assert steps(engine, job_id) == list(range(1, MAX_STEPS + 1))
    assert job_row(engine, job_id).attempts == 1
    kinds = event_kinds(engine, job_id)
    assert kinds.index("paused") < kinds.index("resumed")
    a, b = final_model(settings, straight, MAX_STEPS), final_model(settings, job_id, MAX_STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_heartbeat_sees_a_pause_request(engine: Engine) -> None:
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "w1", lease_s=30)
    assert lease is not None
    with Heartbeat(engine, lease, lease_s=30, every_s=0.02) as hb:
        request_pause(engine, job_id)
        wait_for(hb.pause.is_set, 10, "the heartbeat to see the job pausing")
        assert not hb.cancel.is_set() and not hb.lost.is_set()  # a pausing job is still ours


def test_only_the_lease_holder_pauses_a_pausing_job(engine: Engine) -> None:
    job_id = make_job(engine)
    lease = claim_job(engine, job_id, "w1", lease_s=30)
    assert lease is not None
    assert not pause_held_job(engine, lease, 3)  # running, not pausing: nothing asked for a pause
    request_pause(engine, job_id)
    assert not pause_held_job(engine, type(lease)(job_id, "stale", "w1"), 3)
    assert pause_held_job(engine, lease, 3, "paused by a test")
    row = job_row(engine, job_id)
    assert (row.status, row.lease_token, row.attempts) == ("paused", None, 0)
    assert event_kinds(engine, job_id) == ["paused"]


def test_a_cancel_that_comes_while_the_run_stops_for_a_pause_wins(engine: Engine) -> None:
    lease = claim_job(engine, make_job(engine), "w1", lease_s=30)
    assert lease is not None
    with engine.begin() as conn:  # pausing, then POST /cancel made it cancelling before the hand-back
        conn.execute(update(Job).where(Job.id == lease.job_id).values(status="cancelling", cancel_requested=True))
    assert service._record_pause(engine, lease, SimpleNamespace(step=4), {}) == "cancelled"
    row = job_row(engine, lease.job_id)
    assert (row.status, row.lease_token) == ("cancelled", None) and row.finished_at is not None
    assert event_kinds(engine, lease.job_id) == ["cancelled"]


def test_a_pausing_job_whose_worker_died_becomes_paused_not_queued(engine: Engine) -> None:
    job_id = make_job(engine)
    assert claim_job(engine, job_id, "w1", lease_s=30)
    request_pause(engine, job_id)
    expire_lease(engine, job_id)
    report = reconcile(utcnow(), engine=engine, send=lambda *a: pytest.fail(f"sent {a}"))
    assert (report.paused, report.requeued) == (1, 0)
    row = job_row(engine, job_id)
    assert (row.status, row.lease_token, row.worker_id, row.attempts) == ("paused", None, None, 1)  # a crash
    assert row.paused_at is not None
    with engine.connect() as conn:
        assert conn.execute(select(Event.kind).where(Event.job_id == job_id)).scalars().all() == ["paused"]
    assert claim_job(engine, job_id, "w2", lease_s=30) is None
    assert reconcile(utcnow(), engine=engine, send=lambda *a: pytest.fail(f"sent {a}")).paused == 0


def test_paused_time_does_not_count_toward_the_job_time_limit(engine: Engine, settings: WorkerSettings) -> None:
    started = utcnow() - timedelta(hours=2)
    job_id = make_job(engine, settings.storage_dir, started_at=started, paused_s=7200.0 - 60)
    _spec, _corpus, running_since = service.load_inputs(engine, job_id, settings.storage)
    assert 55 < service.time_left_s(running_since, 120) < 65  # one minute of the limit used, not two hours


def test_a_warm_shutdown_of_a_pausing_job_lands_it_paused_not_queued(
        engine: Engine, settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = make_job(engine, settings.storage_dir, spec=spec_with(max_steps=1_000_000))
    thread, result = run_in_thread(engine, job_id, settings)
    wait_for(lambda: job_row(engine, job_id).step > 0, 60, "the first metrics")
    # the shutdown is seen first (should_stop is polled before should_pause), then the job is pausing
    # by the time the worker hands it back: the order of a pause that arrives during a deploy
    original = service.release_job

    def pause_then_release(engine_: Engine, lease: Any, message: str, step: int | None = None) -> bool:
        request_pause(engine_, lease.job_id)
        return original(engine_, lease, message, step)

    monkeypatch.setattr(service, "release_job", pause_then_release)
    service.SHUTDOWN.set()
    try:
        thread.join(timeout=60)
    finally:
        service.SHUTDOWN.clear()
    assert result == ["paused"]
    row = job_row(engine, job_id)
    assert (row.status, row.lease_token, row.enqueued_at, row.attempts) == ("paused", None, None, 0)
    assert event_kinds(engine, job_id)[-1] == "paused"
    assert checkpoints(engine, job_id)[-1].step == row.step
