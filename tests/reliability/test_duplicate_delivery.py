"""Fault 5: the same job is delivered twice, to two idle workers at once, and again while it runs.

Exactly one worker trains it: attempts == 1, one `started` event, metric rows
once; the other deliveries are dropped by the atomic claim.
"""

from __future__ import annotations

import pytest

from app.extensions import celery_client
from app.services.queue import TRAIN_QUEUE, TRAIN_TASK
from tests.reliability.conftest import Cluster
from tests.reliability.helpers import (
    assert_steps_once,
    events,
    get_job,
    job_spec,
    submit,
    upload,
    wait_status,
)
from worker.testing import wait_for

pytestmark = pytest.mark.integration

MAX_STEPS = 300


def test_same_job_delivered_to_two_workers_is_trained_once(any_cluster: Cluster, corpus: bytes) -> None:
    cluster = any_cluster
    cluster.start_workers("a", "b")
    job_id = submit(cluster, upload(cluster, corpus), spec=job_spec(MAX_STEPS, 100))

    def deliver_again() -> None:
        with cluster.app.app_context():
            celery_client.send_task(TRAIN_TASK, [job_id], TRAIN_QUEUE)

    deliver_again()  # right behind the API's message: both idle workers race for the claim
    wait_for(lambda: get_job(cluster, job_id)["progress"]["step"] > 0, 60, "the job to report steps")
    deliver_again()  # a redelivery while it runs (e.g. a broker visibility timeout)

    job = wait_status(cluster, job_id, {"succeeded"}, 90)
    marker = f"job {job_id} not claimable"
    wait_for(lambda: sum(cluster.log_of(n).count(marker) for n in ("a", "b")) >= 2, 30,
             "both extra deliveries to be dropped")

    trainer = cluster.job_row(job_id).worker_id
    other = ({"a", "b"} - {trainer}).pop()
    assert job["attempts"] == 1 and cluster.job_row(job_id).attempts == 1
    assert marker in cluster.log_of(other), "the second worker received a copy and dropped it"
    assert f"started step 0 of {MAX_STEPS}" not in cluster.log_of(other)
    kinds = [e["kind"] for e in events(cluster, job_id)]
    assert kinds.count("started") == 1 and "resumed" not in kinds and "requeued" not in kinds, kinds
    assert kinds.count("finished") == 1
    assert_steps_once(cluster, job_id, MAX_STEPS)
