"""Job submission, validation, idempotency, listing, cancel and enqueueing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection

from app.extensions import db
from app.models import Event, Job


def _details(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 422, response.json
    return response.json["error"]["details"]


def test_submit_stores_full_defaults(app: Flask, submit: Any, auth: dict[str, str],
                                     dataset: dict[str, Any]) -> None:
    response = submit(auth, dataset["id"], model={"arch": "gru"})
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "queued" and body["id"].startswith("job_")
    spec = body["spec"]
    assert spec["model"] == {
        "arch": "gru", "n_layers": 2, "d_model": 64, "hidden": 128, "context": 8, "n_heads": 4,
        "activation": "tanh", "norm": "none", "norm_position": "pre", "residual": False, "qk_norm": False,
        "init": "default", "init_std": 0.02, "init_gain": 1.0, "recurrent_init": "default", "forget_bias": 0.0,
        "dropout": 0.0, "tie_embeddings": False, "depth_scaled_init": False,
    }
    assert spec["training"]["betas"] == [0.9, 0.999] and spec["training"]["seq_len"] == 16
    assert spec["stabilization"]["clip"]["mode"] == "norm"
    assert spec["stabilization"]["weight_max_norm"] is None
    assert spec["checkpointing"] == {"every_steps": 100, "keep_last": 3}
    assert body["progress"] == {"step": 0, "max_steps": 10, "fraction": 0.0, "tokens_seen": 0, "eta_s": None}
    assert body["enqueued_at"] is not None
    with app.app_context():
        stored = db.session.get(Job, body["id"])
        assert stored.spec == spec and stored.max_steps == 10


@pytest.mark.parametrize("arch", ["mlp", "rnn", "gru", "lstm", "transformer"])
def test_spec_matches_engine_defaults(submit: Any, auth: dict[str, str], dataset: dict[str, Any],
                                      arch: str) -> None:
    engine_config = pytest.importorskip("worker.engine.config")  # stdlib only, no torch
    spec = submit(auth, dataset["id"], model={"arch": arch}).json["spec"]
    assert engine_config.spec_to_dict(engine_config.parse_spec(spec)) == spec
    engine_model = engine_config.spec_to_dict(engine_config.parse_spec({"model": {"arch": arch}}))["model"]
    assert spec["model"] == engine_model
    defaults = engine_config.spec_to_dict(engine_config.parse_spec({}))
    for section in ("tokenizer", "stabilization", "monitoring", "checkpointing"):
        assert spec[section] == defaults[section], section


@pytest.mark.parametrize(("sections", "path"), [
    ({"model": {"arch": "mlp", "colour": "red"}}, "model.colour"),
    ({"surprise": 1}, "surprise"),
    ({"training": {"lr": 0}}, "training.lr"),
    ({"training": {"lr": 1000.0}}, "training.lr"),
    ({"training": {"lr": "0.1"}}, "training.lr"),
    ({"model": {"arch": "cnn"}}, "model.arch"),
    ({"model": {"arch": "transformer", "d_model": 64, "n_heads": 5}}, "model.n_heads"),
    ({"model": {"arch": "rnn", "activation": "gelu"}}, "model.activation"),
    ({"model": {"arch": "lstm", "norm": "batchnorm"}}, "model.norm"),
    ({"model": {"n_layers": True}}, "model.n_layers"),
    ({"training": {"betas": [0.9, 1.5]}}, "training.betas.1"),
    ({"training": {"max_steps": 10, "warmup_steps": 20}}, "training.warmup_steps"),
    ({"stabilization": {"clip": {"mode": "norm", "max_norm": -1}}}, "stabilization.clip.max_norm"),
    ({"stabilization": {"clip": {"bogus": 1}}}, "stabilization.clip.bogus"),
    ({"model": {"arch": "transformer", "d_model": 4096, "n_layers": 64, "n_heads": 8}}, "model"),
    ({"training": {"seq_len": 4096}}, "training.seq_len"),
    ({"training": {"max_steps": 2_000_000}}, "training.max_steps"),
    ({"training": {"seq_len": 1024, "val_fraction": 0.04}}, "dataset_id"),
])
def test_invalid_specs_name_the_field(submit: Any, auth: dict[str, str], dataset: dict[str, Any],
                                      sections: dict[str, Any], path: str) -> None:
    details = _details(submit(auth, dataset["id"], **sections))
    assert path in details, details


def test_dataset_must_exist_and_be_owned(submit: Any, auth: dict[str, str], make_auth: Any,
                                         dataset: dict[str, Any]) -> None:
    assert "dataset_id" in _details(submit(auth, "ds_nope"))
    assert "dataset_id" in _details(submit(make_auth("other"), dataset["id"]))


def test_malformed_and_wrong_type(client: FlaskClient, auth: dict[str, str]) -> None:
    bad = client.post("/v1/jobs", data="{not json", headers={**auth, "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json["error"]["code"] == "bad_request"
    wrong = client.post("/v1/jobs", data="a=b", headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 415 and wrong.json["error"]["code"] == "unsupported_media_type"
    not_object = client.post("/v1/jobs", json=[1, 2], headers=auth)
    assert not_object.status_code == 422


def test_idempotency_key(app: Flask, submit: Any, auth: dict[str, str], make_auth: Any,
                         dataset: dict[str, Any]) -> None:
    first = submit(auth, dataset["id"], extra_headers={"Idempotency-Key": "abc"})
    again = submit(auth, dataset["id"], extra_headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json["id"] == first.json["id"] and again.json["spec"] == first.json["spec"]
    other = submit(auth, dataset["id"], extra_headers={"Idempotency-Key": "xyz"})
    assert other.json["id"] != first.json["id"]
    with app.app_context():
        assert db.session.query(Job).count() == 2


def test_list_filter_and_paging(app: Flask, client: FlaskClient, submit: Any, auth: dict[str, str],
                                make_auth: Any, dataset: dict[str, Any]) -> None:
    ids = [submit(auth, dataset["id"]).json["id"] for _ in range(5)]
    with app.app_context():
        db.session.get(Job, ids[1]).status = "succeeded"
        db.session.commit()
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else ""), headers=auth).json
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    done = client.get("/v1/jobs?status=succeeded", headers=auth).json["items"]
    assert [j["id"] for j in done] == [ids[1]]
    assert "status" in _details(client.get("/v1/jobs?status=bogus", headers=auth))
    assert client.get("/v1/jobs", headers=make_auth("other")).json["items"] == []


def test_read_job(client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    response = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status_code == 200
    for key in ("id", "name", "status", "dataset_id", "spec", "created_at", "started_at", "finished_at",
                "progress", "latest", "health", "error", "attempts"):
        assert key in response.json
    missing = client.get("/v1/jobs/job_000000000000000000000000", headers=auth)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"


def test_eta_from_step_rate(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    from datetime import timedelta

    from app.models import utcnow

    with app.app_context():
        row = db.session.get(Job, job["id"])
        row.status, row.step, row.started_at, row.tokens_seen = "running", 5, utcnow() - timedelta(seconds=10), 80
        db.session.commit()
    progress = client.get(f"/v1/jobs/{job['id']}", headers=auth).json["progress"]
    assert progress["fraction"] == 0.5 and progress["tokens_seen"] == 80
    assert 9 <= progress["eta_s"] <= 12


def test_cancel(app: Flask, client: FlaskClient, submit: Any, auth: dict[str, str],
                dataset: dict[str, Any]) -> None:
    queued = submit(auth, dataset["id"]).json
    response = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth)
    assert response.status_code == 200 and response.json["status"] == "cancelled"
    assert response.json["finished_at"] is not None
    with app.app_context():
        kinds = [e.kind for e in db.session.query(Event).filter_by(job_id=queued["id"])]
        assert kinds == ["cancelled"]
    again = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth)
    assert again.status_code == 409 and again.json["error"]["code"] == "conflict"
    running = submit(auth, dataset["id"]).json
    with app.app_context():
        db.session.get(Job, running["id"]).status = "running"
        db.session.commit()
    response = client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth)
    assert response.status_code == 202
    assert response.json["status"] == "cancelling" and response.json["cancel_requested"] is True


@pytest.mark.app_config(MAX_LIVE_JOBS=2)
def test_live_job_limit(submit: Any, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    assert submit(auth, dataset["id"]).status_code == 202
    assert submit(auth, dataset["id"]).status_code == 202
    third = submit(auth, dataset["id"])
    assert third.status_code == 429 and "limit 2" in third.json["error"]["message"]
    assert third.headers["Retry-After"] == "30"  # the service's own advice, not the rate limiter's window


def test_enqueued_message_lands_on_broker(app: Flask, submit: Any, auth: dict[str, str],
                                          dataset: dict[str, Any]) -> None:
    job_id = submit(auth, dataset["id"]).json["id"]
    with Connection(app.config["BROKER_URL"]) as conn:
        queue = conn.SimpleQueue("train")
        message = queue.get(timeout=5)
        args = message.payload[0] if isinstance(message.payload, list) else json.loads(message.body)[0]
        assert message.headers["task"] == "stabletrain.train_job"
        assert args == [job_id]
        message.ack()
        queue.close()


@pytest.mark.app_config(BROKER_URL="redis://127.0.0.1:1/0")
def test_broker_down_still_accepts(client: FlaskClient, submit: Any, auth: dict[str, str],
                                   dataset: dict[str, Any]) -> None:
    started = time.monotonic()
    response = submit(auth, dataset["id"])
    assert time.monotonic() - started < 5
    assert response.status_code == 202 and response.json["enqueued_at"] is None
    assert client.get(f"/v1/jobs/{response.json['id']}", headers=auth).json["status"] == "queued"
