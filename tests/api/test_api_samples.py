"""Sampling requests: checkpoint choice, enqueue, waiting for the worker's answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection

from app.extensions import db
from app.models import Checkpoint, Sample, utcnow


def _checkpoint(app: Flask, job_id: str, *steps: int) -> None:
    with app.app_context():
        for step in steps:
            db.session.add(Checkpoint(job_id=job_id, step=step, bytes=1, sha256="0" * 64))
        db.session.commit()


def test_needs_a_checkpoint(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    url = f"/v1/jobs/{job['id']}/samples?wait=0"
    none = client.post(url, json={"prompt": "hi"}, headers=auth)
    assert none.status_code == 409 and "checkpoint" in none.json["error"]["message"]
    _checkpoint(app, job["id"], 10)
    assert client.post(url, json={"prompt": "hi", "step": 99}, headers=auth).status_code == 404


def test_validation(client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    url = f"/v1/jobs/{job['id']}/samples?wait=0"
    for body, path in (({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
                       ({"prompt": "x", "temperature": 6}, "temperature"),
                       ({"prompt": "x", "extra": 1}, "extra"),
                       ({}, "prompt")):
        response = client.post(url, json=body, headers=auth)
        assert response.status_code == 422 and path in response.json["error"]["details"], body
    assert "wait" in client.post(f"/v1/jobs/{job['id']}/samples?wait=31", json={"prompt": "x"},
                                 headers=auth).json["error"]["details"]


def test_queued_sample_is_enqueued(app: Flask, client: FlaskClient, auth: dict[str, str],
                                   job: dict[str, Any]) -> None:
    _checkpoint(app, job["id"], 10, 20)
    response = client.post(f"/v1/jobs/{job['id']}/samples?wait=0", json={"prompt": "Once", "top_k": 5},
                           headers=auth)
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "queued" and body["checkpoint_step"] == 20
    assert body["params"] == {"max_new_tokens": 200, "temperature": 1.0, "top_k": 5, "seed": 0}
    again = client.get(f"/v1/jobs/{job['id']}/samples/{body['id']}", headers=auth)
    assert again.status_code == 200 and again.json["id"] == body["id"]
    with Connection(app.config["BROKER_URL"]) as conn:
        queue = conn.SimpleQueue("samples")
        message = queue.get(timeout=5)
        assert message.headers["task"] == "stabletrain.sample" and message.payload[0] == [body["id"]]
        message.ack()
        queue.close()
        train = conn.SimpleQueue("train")
        tasks = []
        while train.qsize():
            msg = train.get(timeout=1)
            tasks.append(msg.headers["task"])
            msg.ack()
        train.close()
        assert tasks == ["stabletrain.train_job"], "a sample must not also land on the train queue"


def _finish_later(app: Flask, delay: float) -> threading.Thread:
    def work() -> None:
        time.sleep(delay)
        with app.app_context():
            sample = db.session.execute(db.select(Sample)).scalar_one()
            sample.status, sample.text, sample.finished_at = "succeeded", "Once upon a time", utcnow()
            db.session.commit()
            db.session.remove()

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_waits_for_the_worker(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    _checkpoint(app, job["id"], 10)
    thread = _finish_later(app, 0.3)
    response = client.post(f"/v1/jobs/{job['id']}/samples?wait=5", json={"prompt": "Once"}, headers=auth)
    thread.join()
    assert response.status_code == 201, response.json
    assert response.json["text"] == "Once upon a time" and response.json["status"] == "succeeded"


def test_answers_202_at_once_by_default(app: Flask, client: FlaskClient, auth: dict[str, str],
                                        job: dict[str, Any]) -> None:
    _checkpoint(app, job["id"], 10)
    response = client.post(f"/v1/jobs/{job['id']}/samples", json={"prompt": "Once"}, headers=auth)
    assert response.status_code == 202 and response.json["status"] == "queued" and response.json["id"].startswith("smp_")
    for wait in ("10.5", "-1", "30"):
        answer = client.post(f"/v1/jobs/{job['id']}/samples?wait={wait}", json={"prompt": "x"}, headers=auth)
        assert answer.status_code == 422 and "wait" in answer.json["error"]["details"], answer.json
    finisher = _finish_when_created(app, "waited")
    waited = client.post(f"/v1/jobs/{job['id']}/samples?wait=10", json={"prompt": "waited"}, headers=auth)
    finisher.join()
    assert waited.status_code == 201 and waited.json["text"] == "done", waited.json


def _finish_when_created(app: Flask, prompt: str) -> threading.Thread:
    """Finish the sample with this prompt as soon as it exists."""
    def work() -> None:
        deadline = time.monotonic() + 10
        with app.app_context():
            while time.monotonic() < deadline:
                done = db.session.execute(db.update(Sample).where(Sample.prompt == prompt).values(
                    status="succeeded", text="done", finished_at=utcnow())).rowcount
                db.session.commit()
                if done:
                    break
                time.sleep(0.02)
            db.session.remove()

    thread = threading.Thread(target=work)
    thread.start()
    return thread


@pytest.mark.app_config(SAMPLE_MAX_WAITING=1)
def test_only_sample_max_waiting_requests_hold_their_thread(app: Flask, auth: dict[str, str],
                                                            job: dict[str, Any]) -> None:
    """With one request already waiting, a second `wait` answers 202 at once instead of holding a thread
    (here its sample is finished right after it exists: a request that waited would answer 201)."""
    from app.services import samples as service

    _checkpoint(app, job["id"], 10)
    url = f"/v1/jobs/{job['id']}/samples?wait=3"
    first: dict[str, Any] = {}
    holder = threading.Thread(target=lambda: first.update(
        response=app.test_client().post(url, json={"prompt": "holder"}, headers=auth)))
    holder.start()
    deadline = time.monotonic() + 10
    while service._waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service._waiting == 1, "the first request never started waiting"
    finisher = _finish_when_created(app, "second")
    second = app.test_client().post(url, json={"prompt": "second"}, headers=auth)
    finisher.join()
    assert second.status_code == 202 and second.json["status"] == "queued", second.json
    holder.join()
    assert first["response"].status_code == 202 and service._waiting == 0
    finisher = _finish_when_created(app, "third")  # the slot is free again: this one waits and gets its text
    third = app.test_client().post(url, json={"prompt": "third"}, headers=auth)
    finisher.join()
    assert third.status_code == 201 and third.json["text"] == "done", third.json


@pytest.mark.app_config(MAX_QUEUED_SAMPLES=3)
def test_per_key_cap_on_pending_samples(app: Flask, client: FlaskClient, auth: dict[str, str], make_auth: Any,
                                        upload: Any, submit: Any, job: dict[str, Any]) -> None:
    _checkpoint(app, job["id"], 10)
    url = f"/v1/jobs/{job['id']}/samples"
    ids = [client.post(url, json={"prompt": str(i)}, headers=auth).json["id"] for i in range(3)]
    over = client.post(url, json={"prompt": "4"}, headers=auth)
    assert over.status_code == 429 and over.headers["Retry-After"] == "5"
    error = over.json["error"]
    assert error["code"] == "rate_limited" and error["details"] == {"pending_samples": 3, "limit": 3}, error
    other = make_auth("other")
    other_job = submit(other, upload(other).json["id"]).json
    _checkpoint(app, other_job["id"], 10)
    assert client.post(f"/v1/jobs/{other_job['id']}/samples", json={"prompt": "x"},
                       headers=other).status_code == 202, "another key has its own cap"
    with app.app_context():  # one running, one done: the key has 2 pending and may queue a third
        db.session.execute(db.update(Sample).where(Sample.id == ids[0]).values(status="running"))
        db.session.execute(db.update(Sample).where(Sample.id == ids[1]).values(status="failed"))
        db.session.commit()
    assert client.post(url, json={"prompt": "5"}, headers=auth).status_code == 202
    assert client.post(url, json={"prompt": "6"}, headers=auth).status_code == 429


@pytest.mark.app_config(MAX_QUEUED_SAMPLES=4)
def test_cap_holds_under_concurrent_requests(app: Flask, auth: dict[str, str], job: dict[str, Any]) -> None:
    _checkpoint(app, job["id"], 10)
    codes: list[int] = []
    barrier = threading.Barrier(10)

    def post(i: int) -> None:
        barrier.wait()
        codes.append(app.test_client().post(f"/v1/jobs/{job['id']}/samples", json={"prompt": str(i)},
                                            headers=auth).status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202] * 4 + [429] * 6, codes
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(Sample)).scalar_one() == 4


def test_worker_serves_keys_round_robin(app: Flask, client: FlaskClient, auth: dict[str, str], make_auth: Any,
                                        upload: Any, submit: Any, job: dict[str, Any]) -> None:
    """Key A queues four samples, then key B two: one sample worker runs A, B, A, B, A, A (the key whose
    last sample started longest ago goes next), not A's backlog first."""
    from worker.service import claim_sample

    other = make_auth("other")
    other_job = submit(other, upload(other).json["id"]).json
    _checkpoint(app, job["id"], 10)
    _checkpoint(app, other_job["id"], 10)
    for i in range(4):
        assert client.post(f"/v1/jobs/{job['id']}/samples", json={"prompt": f"A{i}"}, headers=auth).status_code == 202
    for i in range(2):
        assert client.post(f"/v1/jobs/{other_job['id']}/samples", json={"prompt": f"B{i}"},
                           headers=other).status_code == 202
    order = []
    with app.app_context():
        while (sample_id := claim_sample(db.engine)) is not None:
            sample = db.session.get(Sample, sample_id)
            order.append(sample.prompt)
            sample.status, sample.finished_at = "succeeded", utcnow()
            db.session.commit()
    assert order == ["A0", "B0", "A1", "B1", "A2", "A3"], order
