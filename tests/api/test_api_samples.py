"""Sampling requests: checkpoint choice, enqueue, waiting for the worker's answer."""

from __future__ import annotations

import threading
import time
from typing import Any

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
