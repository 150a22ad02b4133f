"""Fault 6: a worker is frozen (SIGSTOP) mid-job, another takes the job over and finishes it, then the
frozen one wakes up (SIGCONT) and goes on where it was.

Its in-memory fence has not tripped (it was frozen), but every write of its own is
refused by the database (the job no longer carries its lease token): no metric,
checkpoint or event row, no status change, no checkpoint file, after it wakes.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
from typing import Any

import pytest
from sqlalchemy import select

from app.models import Checkpoint, Event, Job, LayerMetric, StepMetric
from tests.reliability.conftest import Cluster
from tests.reliability.helpers import (
    assert_checkpoints_served,
    assert_steps_once,
    checkpoints,
    get_job,
    job_spec,
    submit,
    upload,
    wait_status,
)
from worker.testing import wait_for

pytestmark = pytest.mark.integration

MAX_STEPS, EVERY = 600, 100


def snapshot(cluster: Cluster, job_id: str) -> dict[str, Any]:
    """Every record of the job, and every file of its checkpoint folder with its hash."""
    with cluster.engine.connect() as conn:
        records = {model.__name__: [tuple(r) for r in conn.execute(select(model).where(model.job_id == job_id))]
                   for model in (StepMetric, LayerMetric, Checkpoint, Event)}
        records["Job"] = [tuple(conn.execute(select(Job).where(Job.id == job_id)).one())]
    folder = cluster.root / "storage" / "checkpoints" / job_id
    records["files"] = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.iterdir())
    return records


def freeze_between_writes(cluster: Cluster, name: str) -> None:
    """SIGSTOP the worker, but not inside a write transaction: frozen there it would hold the lock,
    and every other writer (the takeover too) would wait for it, as fencing wants. Taking the write
    lock first waits for the worker's write to end, and while this test holds it the worker cannot be
    inside one; it is released without a commit, so the worker's own read snapshot stays current."""
    proc, database = cluster.workers[name], str(cluster.root / "stabletrain.db")
    conn = sqlite3.connect(database, timeout=60)
    try:
        conn.execute("BEGIN IMMEDIATE")
        proc.send_signal(signal.SIGSTOP)
        conn.rollback()
    finally:
        conn.close()


def test_a_frozen_worker_that_wakes_after_a_takeover_writes_nothing(make_cluster: Any, corpus: bytes) -> None:
    cluster: Cluster = make_cluster()
    cluster.start_workers("a", "b", LEASE_S=3)
    job_id = submit(cluster, upload(cluster, corpus), spec=job_spec(MAX_STEPS, EVERY, keep_last=2))

    def past_first_checkpoint() -> bool:
        listed = checkpoints(cluster, job_id)
        return bool(listed) and get_job(cluster, job_id)["progress"]["step"] > listed[0]["step"]

    wait_for(past_first_checkpoint, 120, "the job to pass its first checkpoint", every_s=0.02)
    frozen = cluster.job_row(job_id).worker_id
    freeze_between_writes(cluster, frozen)
    try:
        wait_status(cluster, job_id, {"succeeded"}, 120)  # the other worker took it over and finished it
        taker = ({"a", "b"} - {frozen}).pop()
        assert cluster.job_row(job_id).worker_id == taker
        before = snapshot(cluster, job_id)
    finally:
        cluster.workers[frozen].send_signal(signal.SIGCONT)

    # the woken worker notices on its next write or heartbeat, and its task ends "lost"
    wait_for(lambda: "'lost'" in cluster.log_of(frozen), 60, "the woken worker to give the job up")
    assert snapshot(cluster, job_id) == before
    assert_steps_once(cluster, job_id, MAX_STEPS)
    assert assert_checkpoints_served(cluster, job_id)[-1]["step"] == MAX_STEPS
