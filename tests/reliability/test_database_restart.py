"""Fault 3: PostgreSQL (a private cluster) goes down and comes back while a job runs.

The worker rides it out: its metric batches, events and heartbeats fail and are
retried on fresh connections, the lease outlasts the outage, and the job
finishes in its first attempt with every metric row 1..max_steps exactly once.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.models import LayerMetric
from tests.reliability.conftest import Cluster, PostgresServer
from tests.reliability.helpers import (
    assert_checkpoints_served,
    assert_steps_once,
    events,
    job_spec,
    submit,
    upload,
)
from worker.testing import wait_for

pytestmark = pytest.mark.integration

MAX_STEPS = 800


def test_worker_rides_out_a_postgres_restart_without_losing_a_metric(postgres_server: PostgresServer,
                                                                     make_cluster: Any, corpus: bytes) -> None:
    cluster: Cluster = make_cluster(database_url=postgres_server.url)
    cluster.start_worker("w1", LEASE_S=30)  # the lease outlasts the outage: no requeue, same attempt
    job_id = submit(cluster, upload(cluster, corpus), spec=job_spec(MAX_STEPS, 200, layer_stats_every=10))

    wait_for(lambda: cluster.job_row(job_id).step > 0, 60, "the job to report steps")
    postgres_server.stop("fast")  # every connection is closed; the worker's next writes fail
    before = len(cluster.log_of("w1"))
    # down long enough for several failed tries of one metric batch (0.2 + 0.4 + 0.8 s of backoff)
    wait_for(lambda: "retrying in 0.8 s" in cluster.log_of("w1")[before:], 60, "the worker to retry a metric batch")
    postgres_server.start()
    # The API's pooled connections died with the server; pool_pre_ping replaces them before use.
    assert cluster.api("GET", f"/v1/jobs/{job_id}").status_code == 200

    # The test's own engine (no pre-ping) fails once on a stale pooled connection and is retried.
    def finished() -> Any:
        try:
            row = cluster.job_row(job_id)
        except Exception:  # noqa: BLE001 - a stale pooled connection, replaced on the next try
            return None
        if row.status in ("failed", "cancelled"):
            pytest.fail(f"job ended {row.status}: {row.error}\n{cluster.log_tail()}")
        return row if row.status == "succeeded" else None

    row = wait_for(finished, 120, "the job to succeed", every_s=0.2)
    assert row.attempts == 1 and row.step == MAX_STEPS and row.error is None
    assert_steps_once(cluster, job_id, MAX_STEPS)
    with cluster.engine.connect() as conn:
        layer_steps = conn.execute(select(func.count(func.distinct(LayerMetric.step)))
                                   .where(LayerMetric.job_id == job_id)).scalar_one()
    assert layer_steps == MAX_STEPS // 10
    kinds = [e["kind"] for e in events(cluster, job_id)]
    assert kinds.count("started") == 1 and "requeued" not in kinds and kinds[-1] == "finished", kinds
    assert assert_checkpoints_served(cluster, job_id)[-1]["step"] == MAX_STEPS
