"""Queued work reaches a worker promptly whatever the broker (a private Redis) did.

- stopped while a job is submitted: the job starts within 5 s of Redis returning
  (the relay sends the outbox every second; the worker reconnects every second);
- restarted empty, or restarted with its data, while jobs wait behind a busy worker:
  they start within 30 s of the worker being free (the relay sees the restart in Redis'
  uptime and re-sends what was sent before it);
- a waiting job's message lost with no restart at all (the queue deleted): an idle
  worker re-sends it (`STABLETRAIN_IDLE_RESEND_S`), within 30 s of being free.

The workers run with the production periods (reconciler every 5 s, resend after
600 s), not the integration suite's short ones. Each test prints its time-to-start.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
import redis

from tests.reliability.conftest import Cluster, RedisServer
from tests.reliability.helpers import events, get_job, job_spec, submit, upload, wait_status
from worker.db import utcnow
from worker.testing import wait_for

pytestmark = pytest.mark.integration

PRODUCTION = {"RECONCILE_EVERY_S": 5, "RESEND_AFTER_S": 600}


def report(capsys: pytest.CaptureFixture[str], what: str, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n[time-to-start] {what}: {seconds:.1f} s")


def started_at(cluster: Cluster, job_id: str) -> datetime:
    return wait_for(lambda: cluster.job_row(job_id).started_at, 90, f"job {job_id} to start", every_s=0.1)


def assert_ran_once(cluster: Cluster, job_id: str) -> None:
    job = wait_status(cluster, job_id, {"succeeded"}, 90)
    kinds = [e["kind"] for e in events(cluster, job_id)]
    assert job["attempts"] == 1 and kinds.count("started") == 1, kinds


def queued_messages(server: RedisServer) -> int:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return int(client.llen("train"))
    finally:
        client.close()


def test_a_job_accepted_while_redis_is_down_starts_within_5_s_of_its_return(
        redis_server: RedisServer, make_cluster: Any, corpus: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    cluster: Cluster = make_cluster(broker_url=redis_server.url)
    cluster.start_worker("w1", **PRODUCTION)
    dataset_id = upload(cluster, corpus)

    redis_server.stop()
    job_id = submit(cluster, dataset_id, spec=job_spec(30, 30))
    assert cluster.job_row(job_id).enqueued_at is None  # in the outbox: the publish failed
    # down long enough that kombu's default reconnect backoff (2, 4, 6, 8 ... s) would be 8 s apart by now
    wait_for(lambda: cluster.log_of("w1").count("Trying again in") >= 12, 60,
             "the worker to fail a dozen reconnects")
    redis_server.start()
    back = utcnow()

    delay = (started_at(cluster, job_id) - back).total_seconds()
    report(capsys, "job accepted while Redis was down, after Redis returned", delay)
    assert delay < 5, cluster.log_tail()
    assert_ran_once(cluster, job_id)


@pytest.mark.parametrize("keep_data", [False, True], ids=["restarted-empty", "restarted-with-data"])
def test_jobs_waiting_in_a_restarted_redis_start_once_the_worker_is_free(
        keep_data: bool, redis_server: RedisServer, make_cluster: Any, corpus: bytes,
        capsys: pytest.CaptureFixture[str]) -> None:
    cluster: Cluster = make_cluster(broker_url=redis_server.url)
    cluster.start_worker("w1", **PRODUCTION)
    dataset_id = upload(cluster, corpus)
    busy = submit(cluster, dataset_id, spec=job_spec(1_000_000, 1000))
    wait_for(lambda: get_job(cluster, busy)["progress"]["step"] > 0, 60, "the busy job to report steps")
    waiting = [submit(cluster, dataset_id, spec=job_spec(30, 30)) for _ in range(2)]
    assert queued_messages(redis_server) == 2  # their messages wait in Redis behind the busy worker

    redis_server.stop(keep_data=keep_data)
    redis_server.start()
    assert queued_messages(redis_server) == (2 if keep_data else 0)

    assert cluster.api("POST", f"/v1/jobs/{busy}/cancel").status_code == 202
    freed = wait_status(cluster, busy, {"cancelled"}, 60)
    free_at = cluster.job_row(busy).finished_at
    delays = [(started_at(cluster, job_id) - free_at).total_seconds() for job_id in waiting]
    what = "with its data" if keep_data else "empty"
    report(capsys, f"jobs waiting while Redis restarted {what}, after the worker was free", delays[0])
    assert delays[0] < 30, cluster.log_tail()
    assert freed["status"] == "cancelled"
    for job_id in waiting:  # re-sent copies (restart with data) are harmless: each job runs once
        assert_ran_once(cluster, job_id)


def test_a_lost_message_is_resent_by_the_idle_worker(redis_server: RedisServer, make_cluster: Any, corpus: bytes,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cluster: Cluster = make_cluster(broker_url=redis_server.url)
    cluster.start_worker("w1", **PRODUCTION)
    dataset_id = upload(cluster, corpus)
    busy = submit(cluster, dataset_id, spec=job_spec(1_000_000, 1000))
    wait_for(lambda: get_job(cluster, busy)["progress"]["step"] > 0, 60, "the busy job to report steps")
    waiting = submit(cluster, dataset_id, spec=job_spec(30, 30))
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    assert client.delete("train") == 1  # the message is gone, with no restart to notice
    client.close()

    assert cluster.api("POST", f"/v1/jobs/{busy}/cancel").status_code == 202
    wait_status(cluster, busy, {"cancelled"}, 60)
    delay = (started_at(cluster, waiting) - cluster.job_row(busy).finished_at).total_seconds()
    report(capsys, "job whose message was lost (no restart), after the worker was free", delay)
    assert delay < 30, cluster.log_tail()
    assert_ran_once(cluster, waiting)
