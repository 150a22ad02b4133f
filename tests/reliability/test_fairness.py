"""Fairness on the training queue: one key's backlog does not starve another key's job.

Key A queues 5 jobs, then key B queues 1; one worker starts. B's job starts second,
not sixth: a train message only says "work available", and the worker claims the
queued job of the key served least recently.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import create_key
from tests.reliability.conftest import Cluster
from tests.reliability.helpers import job_spec, upload
from worker.testing import wait_for

pytestmark = pytest.mark.integration


def submit_as(cluster: Cluster, auth: dict[str, str], dataset_id: str, name: str) -> str:
    body = {**job_spec(20, 20), "name": name, "dataset_id": dataset_id}
    resp = cluster.client.post("/v1/jobs", json=body, headers=auth)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def test_a_second_keys_job_starts_second_not_sixth(make_cluster: Any, corpus: bytes) -> None:
    cluster: Cluster = make_cluster()
    key_a = cluster.auth
    _, secret = create_key(cluster.app.test_cli_runner(), "fairness-b")
    key_b = {"Authorization": f"Bearer {secret}"}
    dataset_a = upload(cluster, corpus)
    cluster.auth = key_b
    dataset_b = upload(cluster, corpus)
    cluster.auth = key_a

    a_jobs = [submit_as(cluster, key_a, dataset_a, f"a{i}") for i in range(5)]
    b_job = submit_as(cluster, key_b, dataset_b, "b0")
    cluster.start_worker("w1")
    for job_id in [*a_jobs, b_job]:
        wait_for(lambda job_id=job_id: cluster.job_row(job_id).status == "succeeded", 120, f"{job_id} to succeed")

    rows = sorted((cluster.job_row(j) for j in [*a_jobs, b_job]), key=lambda r: r.started_at)
    order = [r.id for r in rows]
    assert order.index(b_job) == 1, [r.name for r in rows]
    assert [j for j in order if j != b_job] == a_jobs  # each key's own jobs stay first-in, first-out
    assert all(r.attempts == 1 for r in rows)
