"""Fault 6: a job past the worker's time limit is stopped and marked failed with that reason."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reliability.conftest import Cluster
from tests.reliability.helpers import assert_checkpoints_served, events, job_spec, submit, upload, wait_status

pytestmark = pytest.mark.integration

LIMIT_S = 3


def test_job_past_its_time_limit_fails_with_that_reason(make_cluster: Any, corpus: bytes) -> None:
    cluster: Cluster = make_cluster()
    cluster.start_worker("w1", JOB_TIME_LIMIT_S=LIMIT_S)
    job_id = submit(cluster, upload(cluster, corpus), spec=job_spec(1_000_000, 100))

    job = wait_status(cluster, job_id, {"failed"}, 60)
    assert "time limit" in job["error"] and f"{LIMIT_S} s" in job["error"], job["error"]
    row = cluster.job_row(job_id)
    ran_s = (row.finished_at - row.started_at).total_seconds()
    assert LIMIT_S <= ran_s < LIMIT_S + 10, ran_s
    assert row.attempts == 1 and row.lease_expires_at is None and 0 < job["progress"]["step"] < 1_000_000

    failed = [e for e in events(cluster, job_id) if e["kind"] == "failed"]
    assert len(failed) == 1 and "time limit" in failed[0]["message"], failed
    # the stop wrote a checkpoint of the last step, so the work done is kept and downloadable
    assert assert_checkpoints_served(cluster, job_id)[-1]["step"] == job["progress"]["step"]
