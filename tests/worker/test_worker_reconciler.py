"""The reconciler re-sends lost work through a real (SQLite kombu) broker and requeues dead workers' jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import Engine, select, update

from app.models import Event, Job, Probe, Sample, new_id
from tests.worker.jobfactory import make_job
from worker.db import utcnow
from worker.reconciler import reconcile, relay
from worker.service import Activity
from worker.testing import wait_for

REPO = Path(__file__).resolve().parents[2]


class Broker:
    """A real kombu SQLAlchemy broker in a temp SQLite file, with a Celery client that publishes by name."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = Celery("reconciler-test", broker=url, set_as_current=False)

    def send(self, task: str, record_id: str, queue: str) -> None:
        self.client.send_task(task, args=[record_id], queue=queue)

    def drain(self, queue: str) -> list[tuple[str, list[Any]]]:
        """Every message now in `queue`, as (task name, args), consumed."""
        got = []
        with Connection(self.url) as conn:
            q = conn.SimpleQueue(queue)
            try:
                while True:
                    msg = q.get(timeout=0.5)
                    got.append((msg.headers["task"], msg.decode()[0]))
                    msg.ack()
            except Empty:
                pass
            finally:
                q.close()
        return got


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}")
    yield b
    b.client.close()


def job(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Job).where(Job.id == job_id)).one()


def test_unenqueued_job_gets_one_message_until_resend_is_due(engine: Engine, broker: Broker) -> None:
    job_id = make_job(engine)  # enqueued_at is null: the API's publish failed
    now = utcnow()
    assert reconcile(now, engine=engine, send=broker.send, resend_after_s=60).resent == 1
    assert reconcile(now + timedelta(seconds=1), engine=engine, send=broker.send, resend_after_s=60).resent == 0
    assert broker.drain("train") == [("stabletrain.train_job", [job_id])]
    assert job(engine, job_id).enqueued_at is not None
    later = now + timedelta(seconds=61)  # the message may have been lost: send again
    assert reconcile(later, engine=engine, send=broker.send, resend_after_s=60).resent == 1
    assert broker.drain("train") == [("stabletrain.train_job", [job_id])]


def test_recently_enqueued_and_running_jobs_are_left_alone(engine: Engine, broker: Broker) -> None:
    now = utcnow()
    make_job(engine, enqueued_at=now)
    make_job(engine, status="running", worker_id="w1", lease_expires_at=now + timedelta(seconds=30))
    report = reconcile(now, engine=engine, send=broker.send, resend_after_s=60)
    assert (report.resent, report.requeued) == (0, 0)
    assert broker.drain("train") == []


def test_expired_lease_goes_back_to_queue_and_is_resent(engine: Engine, broker: Broker) -> None:
    now = utcnow()
    job_id = make_job(engine, status="running", worker_id="dead", attempts=1, started_at=now,
                      lease_expires_at=now - timedelta(seconds=1), enqueued_at=now - timedelta(seconds=5))
    report = reconcile(now, engine=engine, send=broker.send, resend_after_s=600)
    assert (report.requeued, report.resent) == (1, 1)
    row = job(engine, job_id)
    assert (row.status, row.worker_id, row.lease_expires_at, row.attempts) == ("queued", None, None, 1)
    assert broker.drain("train") == [("stabletrain.train_job", [job_id])]
    with engine.connect() as conn:
        kinds = conn.execute(select(Event.kind).where(Event.job_id == job_id)).scalars().all()
    assert kinds == ["requeued"]


def test_cancelling_job_without_worker_is_cancelled(engine: Engine, broker: Broker) -> None:
    now = utcnow()
    job_id = make_job(engine, status="cancelling", cancel_requested=True, worker_id="dead",
                      lease_expires_at=now - timedelta(seconds=1))
    assert reconcile(now, engine=engine, send=broker.send).cancelled == 1
    row = job(engine, job_id)
    assert row.status == "cancelled" and row.finished_at is not None


def test_concurrent_reconcilers_send_each_job_once(engine: Engine, broker: Broker) -> None:
    ids = {make_job(engine) for _ in range(5)}
    now = utcnow()
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            reconcile(now, engine=engine, send=broker.send, resend_after_s=60)
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    messages = broker.drain("train")
    assert sorted(args[0] for _, args in messages) == sorted(ids)


def test_failed_publish_is_retried_on_the_next_pass(engine: Engine, broker: Broker) -> None:
    job_id = make_job(engine)

    def broker_down(task: str, record_id: str, queue: str) -> None:
        raise ConnectionError("broker unreachable")

    now = utcnow()
    assert reconcile(now, engine=engine, send=broker_down).resent == 0
    assert job(engine, job_id).enqueued_at is None
    assert reconcile(now, engine=engine, send=broker.send).resent == 1


def test_samples_are_resent_or_timed_out(engine: Engine, broker: Broker) -> None:
    job_id = make_job(engine, status="succeeded")
    now = utcnow()
    with engine.connect() as conn:
        owner = conn.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one()
    old = now - timedelta(seconds=700)
    rows = [dict(id=new_id("smp"), job_id=job_id, owner_id=owner, checkpoint_step=10, prompt="a", params={},
                 status=status, created_at=old) for status in ("queued", "running")]
    with engine.begin() as conn:
        conn.execute(Sample.__table__.insert(), rows)
    report = reconcile(now, engine=engine, send=broker.send, resend_after_s=600, sample_timeout_s=600)
    assert (report.samples_resent, report.samples_failed) == (1, 1)
    assert broker.drain("samples") == [("stabletrain.sample", [rows[0]["id"]])]
    with engine.connect() as conn:
        failed = conn.execute(select(Sample).where(Sample.id == rows[1]["id"])).one()
    assert failed.status == "failed" and "600" in failed.error


def test_probes_are_resent_or_timed_out_and_the_relay_sends_an_unsent_one(engine: Engine, broker: Broker) -> None:
    job_id = make_job(engine, status="succeeded")
    now = utcnow()
    with engine.connect() as conn:
        owner = conn.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one()
    params = {"lr_min": 1e-7, "lr_max": 10.0, "steps": 200}
    base = dict(job_id=job_id, owner_id=owner, params=params, created_at=now - timedelta(hours=3),
                started_at=None)  # every row names every column: an executemany takes the first row's keys
    lost = dict(base, id=new_id("prb"), status="queued", enqueued_at=now - timedelta(seconds=700))
    dead = dict(base, id=new_id("prb"), status="running", enqueued_at=now - timedelta(hours=2),
                started_at=now - timedelta(seconds=3700))  # its worker died an hour ago
    busy = dict(dead, id=new_id("prb"), started_at=now - timedelta(seconds=60))  # queued long, started lately
    unsent = dict(base, id=new_id("prb"), status="queued", enqueued_at=None)
    with engine.begin() as conn:
        conn.execute(Probe.__table__.insert(), [lost, dead, busy])
    report = reconcile(now, engine=engine, send=broker.send, resend_after_s=600, probe_timeout_s=3600)
    assert (report.probes_resent, report.probes_failed) == (1, 1)
    assert broker.drain("samples") == [("stabletrain.lr_probe", [lost["id"]])]
    with engine.begin() as conn:
        rows = {r.id: r for r in conn.execute(select(Probe).where(Probe.job_id == job_id))}
        conn.execute(Probe.__table__.insert(), [unsent])
    assert rows[dead["id"]].status == "failed" and "3600" in rows[dead["id"]].error
    assert rows[dead["id"]].finished_at is not None
    assert rows[busy["id"]].status == "running" and rows[lost["id"]].status == "queued"
    assert relay(now, engine=engine, send=broker.send) == 1
    assert broker.drain("samples") == [("stabletrain.lr_probe", [unsent["id"]])]


def test_cli_once_resends_through_the_configured_broker(engine: Engine, broker: Broker, tmp_path: Path) -> None:
    job_id = make_job(engine)
    env = {**os.environ, "STABLETRAIN_DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "STABLETRAIN_BROKER_URL": broker.url, "STABLETRAIN_STORAGE_DIR": str(tmp_path / "storage")}
    out = subprocess.run([sys.executable, "-m", "worker.reconciler", "--once"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "resent=1" in out.stdout
    assert broker.drain("train") == [("stabletrain.train_job", [job_id])]
    with engine.begin() as conn:  # leave nothing claimable for later tests of this session
        conn.execute(update(Job).where(Job.id == job_id).values(status="cancelled"))


def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(engine: Engine, broker: Broker) -> None:
    now = utcnow()
    job_id = make_job(engine, status="running", worker_id="dead", attempts=3, started_at=now,
                      lease_expires_at=now - timedelta(seconds=1), enqueued_at=now - timedelta(seconds=5))
    report = reconcile(now, engine=engine, send=broker.send, resend_after_s=600, max_attempts=3)
    assert report.requeued == 0
    row = job(engine, job_id)
    assert row.status == "failed" and "died 3 times" in row.error and row.lease_expires_at is None
    assert broker.drain("train") == []


def test_a_queued_sample_is_resent_once_per_period_and_times_out_from_its_start(engine: Engine,
                                                                                broker: Broker) -> None:
    job_id = make_job(engine, status="succeeded")
    now = utcnow()
    with engine.connect() as conn:
        owner = conn.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one()
    long_ago = now - timedelta(hours=2)
    waiting = dict(id=new_id("smp"), job_id=job_id, owner_id=owner, checkpoint_step=10, prompt="a", params={},
                   status="queued", created_at=long_ago, enqueued_at=None, started_at=None)
    # waited two hours in the queue, started a minute ago: not timed out
    started = dict(waiting, id=new_id("smp"), status="running", enqueued_at=long_ago,
                   started_at=now - timedelta(seconds=60))
    with engine.begin() as conn:
        conn.execute(Sample.__table__.insert(), [waiting, started])
    for seconds in (0, 5, 10):  # three passes within one resend period: one message, not three
        reconcile(now + timedelta(seconds=seconds), engine=engine, send=broker.send, resend_after_s=600,
                  sample_timeout_s=600)
    assert broker.drain("samples") == [("stabletrain.sample", [waiting["id"]])]
    with engine.connect() as conn:
        assert conn.execute(select(Sample.status).where(Sample.id == started["id"])).scalar_one() == "running"


def test_the_relay_sends_the_outbox_and_resends_what_a_restarted_broker_lost(engine: Engine,
                                                                             broker: Broker) -> None:
    now = utcnow()
    unsent = make_job(engine)  # the API's publish failed, or the job was handed back
    before_restart = make_job(engine, enqueued_at=now - timedelta(seconds=30))
    after_restart = make_job(engine, enqueued_at=now - timedelta(seconds=5))
    restarted_at = now - timedelta(seconds=10)
    assert relay(now, engine=engine, send=broker.send, broker_started_at=restarted_at) == 2
    assert sorted(args[0] for _, args in broker.drain("train")) == sorted([unsent, before_restart])
    # the next pass (or another worker's) sends nothing again: the re-sent job's stamp is newer
    assert relay(now + timedelta(seconds=1), engine=engine, send=broker.send, broker_started_at=restarted_at) == 0
    assert relay(now, engine=engine, send=broker.send) == 0  # embedded broker: no restart to watch
    assert broker.drain("train") == []
    assert job(engine, after_restart).enqueued_at == now - timedelta(seconds=5)


def test_the_relay_resends_samples_a_restarted_broker_lost(engine: Engine, broker: Broker) -> None:
    job_id = make_job(engine, status="succeeded")
    now = utcnow()
    with engine.connect() as conn:
        owner = conn.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one()
    sample = dict(id=new_id("smp"), job_id=job_id, owner_id=owner, checkpoint_step=10, prompt="a", params={},
                  status="queued", created_at=now, enqueued_at=now - timedelta(seconds=30))
    with engine.begin() as conn:
        conn.execute(Sample.__table__.insert(), [sample])
    assert relay(now, engine=engine, send=broker.send, broker_started_at=now - timedelta(seconds=10)) == 1
    assert broker.drain("samples") == [("stabletrain.sample", [sample["id"]])]


def test_an_idle_worker_resends_jobs_that_waited_longer_than_it_was_idle(engine: Engine, broker: Broker) -> None:
    now = utcnow()
    lost = make_job(engine, enqueued_at=now - timedelta(seconds=20))
    recent = make_job(engine, enqueued_at=now - timedelta(seconds=5))
    busy = reconcile(now, engine=engine, send=broker.send, idle_for_s=0, idle_resend_s=10)
    just_idle = reconcile(now, engine=engine, send=broker.send, idle_for_s=9, idle_resend_s=10)
    assert (busy.idle_resent, just_idle.idle_resent, broker.drain("train")) == (0, 0, [])
    report = reconcile(now, engine=engine, send=broker.send, idle_for_s=15, idle_resend_s=10)
    assert (report.idle_resent, report.resent) == (1, 0)
    assert broker.drain("train") == [("stabletrain.train_job", [lost])]
    assert job(engine, recent).enqueued_at == now - timedelta(seconds=5)


def test_activity_tracks_busy_and_idle_time() -> None:
    activity = Activity()
    with activity.busy():
        assert activity.idle_for_s() == 0.0
    first = activity.idle_for_s()
    assert 0.0 < first < 1.0
    wait_for(lambda: activity.idle_for_s() > first, 5, "the idle time to grow")
