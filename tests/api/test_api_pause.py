"""POST /v1/jobs/{id}/pause and /resume: state transitions, the live-job limit, cancel and retry of paused
jobs, the 409s. (A running job's pause through a real worker: tests/worker/test_worker_pause.py and
tests/integration/test_pause_end_to_end.py.)"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection

from app.extensions import db
from app.models import Event, Job, utcnow


def set_status(app: Flask, job_id: str, status: str, **values: Any) -> None:
    with app.app_context():
        row = db.session.get(Job, job_id)
        row.status = status
        for name, value in values.items():
            setattr(row, name, value)
        db.session.commit()


def event_log(app: Flask, job_id: str) -> list[tuple[str, str]]:
    with app.app_context():
        return [(e.kind, e.message) for e in db.session.query(Event).filter_by(job_id=job_id).order_by(Event.id)]


def train_messages(app: Flask) -> list[str]:
    """Job ids of the train messages waiting on the broker (consumed)."""
    ids = []
    with Connection(app.config["BROKER_URL"]) as conn:
        queue = conn.SimpleQueue("train")
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                break
            args = message.payload[0] if isinstance(message.payload, list) else json.loads(message.body)[0]
            ids += args
            message.ack()
        queue.close()
    return ids


def post(client: FlaskClient, auth: dict[str, str], job_id: str, action: str) -> Any:
    return client.post(f"/v1/jobs/{job_id}/{action}", headers=auth)


def test_a_queued_job_pauses_at_once_and_resume_queues_it_again(
        app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    assert train_messages(app) == [job["id"]]  # the submit's message
    paused = post(client, auth, job["id"], "pause")
    assert paused.status_code == 200 and paused.json["status"] == "paused"
    assert paused.json["paused_at"] is not None and paused.json["finished_at"] is None
    again = post(client, auth, job["id"], "pause")  # a repeated pause changes nothing
    assert again.status_code == 200 and again.json["paused_at"] == paused.json["paused_at"]
    assert client.get("/v1/jobs?status=paused", headers=auth).json["items"][0]["id"] == job["id"]

    resumed = post(client, auth, job["id"], "resume")
    assert resumed.status_code == 202 and resumed.json["status"] == "queued"
    assert resumed.json["paused_at"] is None and resumed.json["enqueued_at"] is not None
    assert train_messages(app) == [job["id"]]  # sent again through the outbox path
    repeat = post(client, auth, job["id"], "resume")  # a repeated resume: already queued, nothing sent
    assert repeat.status_code == 200 and repeat.json["status"] == "queued"
    assert train_messages(app) == []
    assert [kind for kind, _ in event_log(app, job["id"])] == ["paused", "requeued"]


def test_a_running_job_is_pausing_until_its_worker_hands_it_back(
        app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    set_status(app, job["id"], "running", worker_id="w1", lease_token="t", started_at=utcnow())
    pausing = post(client, auth, job["id"], "pause")
    assert pausing.status_code == 202 and pausing.json["status"] == "pausing"
    again = post(client, auth, job["id"], "pause")
    assert again.status_code == 202 and again.json["status"] == "pausing"
    early = post(client, auth, job["id"], "resume")
    assert early.status_code == 409 and early.json["error"]["details"] == {"status": "pausing"}
    assert "once it is paused" in early.json["error"]["message"]
    assert event_log(app, job["id"]) == []  # the worker writes the pause when it stops


def test_running_job_resume_is_a_no_op(app: Flask, client: FlaskClient, auth: dict[str, str],
                                       job: dict[str, Any]) -> None:
    set_status(app, job["id"], "running")
    response = post(client, auth, job["id"], "resume")
    assert response.status_code == 200 and response.json["status"] == "running"


@pytest.mark.parametrize("status", ["cancelling", "succeeded", "failed", "cancelled"])
def test_pause_and_resume_refuse_jobs_being_cancelled_or_finished(
        app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any], status: str) -> None:
    set_status(app, job["id"], status)
    for action in ("pause", "resume"):
        response = post(client, auth, job["id"], action)
        assert response.status_code == 409, (action, response.json)
        assert response.json["error"]["code"] == "conflict" and response.json["error"]["details"] == {"status": status}
    with app.app_context():
        assert db.session.get(Job, job["id"]).status == status


def test_pause_and_resume_of_another_keys_job_is_404(client: FlaskClient, make_auth: Any, job: dict[str, Any]) -> None:
    other = make_auth("other")
    for action in ("pause", "resume"):
        assert post(client, other, job["id"], action).status_code == 404


def test_cancel_of_a_paused_job_is_immediate_and_of_a_pausing_one_is_cancelling(
        app: Flask, client: FlaskClient, submit: Any, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    paused = submit(auth, dataset["id"]).json
    assert post(client, auth, paused["id"], "pause").status_code == 200
    cancelled = post(client, auth, paused["id"], "cancel")
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert cancelled.json["finished_at"] is not None
    assert event_log(app, paused["id"])[-1] == ("cancelled", "cancelled while paused")

    pausing = submit(auth, dataset["id"]).json
    set_status(app, pausing["id"], "pausing")
    response = post(client, auth, pausing["id"], "cancel")
    assert response.status_code == 202 and response.json["status"] == "cancelling"


def test_a_paused_job_cannot_be_retried_and_keeps_its_dataset(
        client: FlaskClient, auth: dict[str, str], job: dict[str, Any], dataset: dict[str, Any]) -> None:
    assert post(client, auth, job["id"], "pause").status_code == 200
    retry = client.post(f"/v1/jobs/{job['id']}/retry", headers=auth, json={"apply": []})
    assert retry.status_code == 409 and retry.json["error"]["details"] == {"status": "paused"}
    deleted = client.delete(f"/v1/datasets/{dataset['id']}", headers=auth)
    assert deleted.status_code == 409 and deleted.json["error"]["details"] == {"job_id": job["id"]}


@pytest.mark.app_config(MAX_LIVE_JOBS=2)
def test_paused_jobs_do_not_count_toward_the_live_limit_but_resume_does(
        app: Flask, client: FlaskClient, submit: Any, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    first = submit(auth, dataset["id"]).json
    second = submit(auth, dataset["id"]).json
    assert submit(auth, dataset["id"]).status_code == 429
    assert post(client, auth, first["id"], "pause").status_code == 200
    third = submit(auth, dataset["id"])
    assert third.status_code == 202  # the paused job freed its place
    refused = post(client, auth, first["id"], "resume")
    assert refused.status_code == 429 and refused.json["error"]["details"] == {"live_jobs": 2, "limit": 2}
    with app.app_context():
        assert db.session.get(Job, first["id"]).status == "paused"  # the refused resume changed nothing
    set_status(app, second["id"], "pausing")  # pausing still holds its worker: it counts
    assert post(client, auth, first["id"], "resume").status_code == 429
    set_status(app, second["id"], "paused")
    assert post(client, auth, first["id"], "resume").status_code == 202


def test_paused_time_after_the_start_is_kept_and_left_out_of_the_eta(
        app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    now = utcnow()
    set_status(app, job["id"], "paused", started_at=now - timedelta(seconds=110), paused_at=now - timedelta(seconds=100),
               step=5)
    assert post(client, auth, job["id"], "resume").status_code == 202
    with app.app_context():
        assert 99 < db.session.get(Job, job["id"]).paused_s < 110
    set_status(app, job["id"], "running")
    progress = client.get(f"/v1/jobs/{job['id']}", headers=auth).json["progress"]
    assert 9 <= progress["eta_s"] <= 12  # 5 of 10 steps in ~10 s of running time, not 110 s


def test_a_job_paused_before_it_started_keeps_no_paused_time(
        app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    set_status(app, job["id"], "paused", paused_at=utcnow() - timedelta(hours=1))
    assert post(client, auth, job["id"], "resume").status_code == 202
    with app.app_context():
        assert db.session.get(Job, job["id"]).paused_s == 0.0  # its time limit starts at its first claim
