"""Fault 2: the broker (a private Redis) is stopped while jobs run and are submitted.

Every 202 the API gives while Redis is down is a job that runs once Redis is
back (the worker's reconciler re-sends what the API could not publish); an API
that answers 503 instead must have kept nothing. `/readyz` names the broker as
down meanwhile. The job that was running when Redis stopped finishes too.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.models import Job
from tests.reliability.conftest import Cluster, RedisServer
from tests.reliability.helpers import assert_steps_once, get_job, job_spec, submit, upload, wait_status
from worker.testing import wait_for

pytestmark = pytest.mark.integration


def test_jobs_accepted_while_redis_is_down_run_once_it_is_back(redis_server: RedisServer, make_cluster: Any,
                                                               corpus: bytes) -> None:
    cluster: Cluster = make_cluster(broker_url=redis_server.url)
    cluster.start_worker("w1")
    dataset_id = upload(cluster, corpus)
    running = submit(cluster, dataset_id, spec=job_spec(800, 200))
    wait_for(lambda: get_job(cluster, running)["progress"]["step"] > 0, 60, "the first job to report steps")

    redis_server.stop()
    ready = cluster.client.get("/readyz")
    assert ready.status_code == 503, ready.get_json()
    assert "broker" in ready.get_json()["error"]["message"]
    assert ready.get_json()["error"]["details"]["broker"].startswith("down")
    assert ready.get_json()["error"]["details"]["database"] == "ok"

    accepted, refused = [], 0
    for i in range(4):
        body = {**job_spec(60 + i, 30), "dataset_id": dataset_id}
        resp = cluster.client.post("/v1/jobs", json=body, headers={**cluster.auth, "Idempotency-Key": f"down-{i}"})
        if resp.status_code == 202:
            assert resp.get_json()["status"] == "queued"
            accepted.append((resp.get_json()["id"], 60 + i))
        else:
            assert resp.status_code == 503, resp.get_json()
            refused += 1
    with cluster.engine.connect() as conn:  # a 503 kept nothing; a 202 kept its job
        assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == 1 + len(accepted)
    assert ready.status_code == 503 and len(accepted) + refused == 4

    redis_server.start()
    wait_for(lambda: cluster.client.get("/readyz").status_code == 200, 30, "/readyz to be ready again")
    job = wait_status(cluster, running, {"succeeded"}, 90)
    assert job["attempts"] == 1
    for job_id, max_steps in accepted:
        job = wait_status(cluster, job_id, {"succeeded"}, 90)
        assert job["attempts"] == 1 and job["enqueued_at"] is not None
        assert_steps_once(cluster, job_id, max_steps)
