"""Webhooks end to end: API, a training worker and a `webhooks` worker (threads pool) as real Celery processes,
and a receiver on 127.0.0.1 that is down while the job runs and comes back. Retries are Celery's own
(`self.retry(countdown=...)`, a tiny schedule here); every event arrives, each webhook-id acted on once."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Stack, stack_backends, start_worker_process
from tests.integration.test_worker_end_to_end import submit, upload, wait_status
from tests.worker.webhook_receiver import Receiver
from worker.testing import wait_for

pytestmark = pytest.mark.integration

WEBHOOK_CONFIG = {
    "WEBHOOK_ALLOW_HTTP": "1",
    "WEBHOOK_ALLOW_PRIVATE": "1",
    # over 16 minutes of retries (13 at the -20% jitter), far more than the job's 180 s + the 60 s wait for
    # first attempts: the job.queued delivery must still be pending when the test checks it, however slowly a
    # loaded CI machine runs the job. (A minute of retries ran out there: that delivery had failed.)
    "WEBHOOK_RETRY_SCHEDULE": ",".join(["0.3", "0.5", "1", "2", "3"] + ["5"] * 200),
    # the relay steps in only for a message lost for this long: the retries seen here are Celery's
    "WEBHOOK_RESEND_AFTER_S": "120",
    "RELAY_EVERY_S": "0.2",
}
WEBHOOKS_POOL = ("-Q", "webhooks", "-c", "4", "--pool=threads")


@pytest.fixture(scope="module", params=["embedded", "servers"])
def webhook_stack(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, subprocess.Popen[bytes]]]:
    """Embedded (SQLite + kombu's SQLAlchemy broker) or servers (PostgreSQL + Redis: Celery's countdown
    retries wait in the worker while Redis holds them unacked)."""
    root: Path = tmp_path_factory.mktemp(f"webhook-stack-{request.param}")
    database_url, broker_url, cleanups = stack_backends(request.param, root, "stabletrain_wh")
    stack = Stack(f"webhooks-{request.param}", database_url, broker_url, root, WEBHOOK_CONFIG)
    senders = None
    try:
        stack.migrate()
        stack.start_worker()
        senders = start_worker_process(stack.env, root / "webhooks.log", "webhooks", WEBHOOKS_POOL)
        yield stack, senders
    finally:
        if senders is not None and senders.poll() is None:
            senders.send_signal(signal.SIGTERM)
            senders.wait(timeout=60)
        stack.close()
        for cleanup in reversed(cleanups):
            cleanup()


def deliveries(stack: Stack, webhook_id: str) -> list[dict[str, Any]]:
    response = stack.api("GET", f"/v1/webhooks/{webhook_id}/deliveries?limit=200")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


def test_events_reach_a_receiver_that_was_down_each_once(webhook_stack: Any, corpus: bytes) -> None:
    stack, _ = webhook_stack
    receiver = Receiver().start()
    created = stack.api("POST", "/v1/webhooks", json={"url": receiver.url, "events": [
        "job.queued", "job.running", "job.succeeded", "checkpoint.created"]})
    assert created.status_code == 201, created.get_json()
    webhook = created.get_json()
    receiver.use_secret(webhook["secret"])
    receiver.stop()  # down while the job runs: every first attempt fails

    job_id = submit(stack, upload(stack, corpus), max_steps=20)
    wait_status(stack, job_id, {"succeeded"}, 180)
    wait_for(lambda: len(deliveries(stack, webhook["id"])) == 5
             and all(d["attempts"] >= 1 for d in deliveries(stack, webhook["id"])), 60, "the first failed attempts")
    waiting = deliveries(stack, webhook["id"])
    assert all(d["status"] == "pending" and d["last_status_code"] is None for d in waiting), waiting

    receiver.start()
    try:
        wait_for(lambda: all(d["status"] == "succeeded" for d in deliveries(stack, webhook["id"])), 60,
                 "every delivery to succeed once the receiver is back")
    finally:
        receiver.stop()
    log = deliveries(stack, webhook["id"])
    assert sorted(d["event_type"] for d in log) == ["checkpoint.created", "checkpoint.created", "job.queued",
                                                    "job.running", "job.succeeded"]
    assert set(receiver.acted) == {d["webhook_id"] for d in log} and receiver.bad_signatures == 0
    assert all(d["attempts"] >= 2 and d["last_status_code"] == 204 and d["log"][0]["status_code"] is None
               for d in log)
    steps = sorted(p["data"]["checkpoint"]["step"] for p in receiver.acted.values()
                   if p["type"] == "checkpoint.created")
    assert steps == [10, 20]
