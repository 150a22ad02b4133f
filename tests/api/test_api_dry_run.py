"""POST /v1/jobs?dry_run=true and /v1/jobs/{id}/probes through the API (the worker's side is faked by rows)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection
from sqlalchemy import func, select

from app.extensions import db
from app.models import DeviceCalibration, Job, Probe, utcnow
from worker.engine import estimate
from worker.engine.config import parse_spec, spec_to_dict

SPEC = {"name": "t", "model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 2},
        "training": {"max_steps": 50, "batch_size": 4, "seq_len": 16, "grad_accum_steps": 2, "eval_every": 25}}


def _dry(client: FlaskClient, auth: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs?dry_run=true", json=body, headers=auth)


def _jobs(app: Flask) -> int:
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(Job)).scalar_one()


def _queued_tasks(app: Flask, queue_name: str) -> list[tuple[str, list[Any]]]:
    out = []
    with Connection(app.config["BROKER_URL"]) as conn:
        queue = conn.SimpleQueue(queue_name)
        while queue.qsize():
            msg = queue.get(timeout=1)
            out.append((msg.headers["task"], msg.payload[0]))
            msg.ack()
        queue.close()
    return out


def _calibrate(app: Flask, flops_per_s: float, age: timedelta = timedelta()) -> None:
    with app.app_context():
        db.session.add(DeviceCalibration(device_class="cpu:test", flops_per_s=flops_per_s, details={},
                                         measured_at=utcnow() - age))
        db.session.commit()


def test_dry_run_numbers_and_no_job(app: Flask, client: FlaskClient, auth: dict[str, str],
                                    dataset: dict[str, Any]) -> None:
    response = _dry(client, auth, {**SPEC, "dataset_id": dataset["id"]})
    assert response.status_code == 200, response.json
    body = response.json
    parsed = spec_to_dict(parse_spec({**SPEC, "dataset_id": dataset["id"]}))
    expected = estimate.estimate(parsed, 256)
    assert body["params"] == expected["params"] == estimate.count_params(parsed["model"], 256, 16)
    assert body["tokens"] == 50 * 4 * 2 * 16
    assert body["train_flops"] == 6 * body["params"] * body["tokens"]
    assert body["memory"]["optimizer_bytes"] == 2 * 4 * body["params"]  # adamw: two fp32 states
    assert body["memory"]["total_bytes"] == sum(body["memory"][k] for k in
                                                ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"))
    assert body["vocab_size"] == 256 and body["vocab_exact"] is True
    # nothing cached: no wall time, a reason, and a calibration was requested from the train workers
    assert body["estimated_wall_s"] is None and "calibration was requested" in body["wall_reason"]
    assert _queued_tasks(app, "train") == [("stabletrain.calibrate", ["dry_run"])]
    assert _jobs(app) == 0


def test_cached_calibration_answers_fast(app: Flask, client: FlaskClient, auth: dict[str, str],
                                         dataset: dict[str, Any]) -> None:
    _calibrate(app, 2e9)
    body = {**SPEC, "dataset_id": dataset["id"]}
    _dry(client, auth, body)  # first request warms the app's caches
    start = time.perf_counter()
    response = _dry(client, auth, body)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200 and elapsed < 2.0, elapsed
    out = response.json
    assert out["device_class"] == "cpu:test" and out["wall_reason"] is None
    assert out["estimated_wall_s"] == out["flops"] / 2e9
    assert _queued_tasks(app, "train") == []  # a fresh figure asks for no new measurement
    assert _jobs(app) == 0


def test_stale_calibration_is_used_and_refreshed(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                 dataset: dict[str, Any]) -> None:
    _calibrate(app, 1e9, age=timedelta(days=30))
    response = _dry(client, auth, {**SPEC, "dataset_id": dataset["id"]})
    assert response.json["estimated_wall_s"] == response.json["flops"] / 1e9
    assert _queued_tasks(app, "train") == [("stabletrain.calibrate", ["stale"])]


def test_char_vocab_counts_the_corpus(client: FlaskClient, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    from tests.api.conftest import CORPUS
    response = _dry(client, auth, {**SPEC, "dataset_id": dataset["id"], "tokenizer": {"kind": "char"}})
    assert response.json["vocab_size"] == len(set(CORPUS)) + 1 and response.json["vocab_exact"] is True


def test_same_422s_as_submit(app: Flask, client: FlaskClient, auth: dict[str, str], make_auth: Any,
                             dataset: dict[str, Any]) -> None:
    other = make_auth("other")
    cases = [
        {**SPEC, "dataset_id": dataset["id"], "training": {"lr": -1}},
        {**SPEC, "dataset_id": "ds_" + "0" * 24},
        {**SPEC, "dataset_id": dataset["id"], "model": {"arch": "transformer", "d_model": 30, "n_heads": 4}},
        {**SPEC, "dataset_id": dataset["id"], "training": {"seq_len": 100_000}},
        {**SPEC, "dataset_id": dataset["id"], "bogus": 1},
    ]
    for body in cases:
        dry = _dry(client, auth, body)
        real = client.post("/v1/jobs", json=body, headers=auth)
        assert dry.status_code == real.status_code == 422, (body, dry.json)
        assert dry.json["error"]["details"] == real.json["error"]["details"]
    # another key's dataset looks absent, as on submit
    assert _dry(client, other, {**SPEC, "dataset_id": dataset["id"]}).status_code == 422
    assert _jobs(app) == 0


def test_probe_is_queued_polled_and_capped(app: Flask, client: FlaskClient, auth: dict[str, str],
                                           job: dict[str, Any]) -> None:
    url = f"/v1/jobs/{job['id']}/probes"
    created = client.post(url, json={"lr_min": 1e-6, "lr_max": 1.0, "steps": 50}, headers=auth)
    assert created.status_code == 202, created.json
    probe = created.json
    assert probe["status"] == "queued" and probe["params"] == {"lr_min": 1e-6, "lr_max": 1.0, "steps": 50}
    assert ("stabletrain.lr_probe", [probe["id"]]) in _queued_tasks(app, "samples")
    with app.app_context():
        db.session.execute(Probe.__table__.update().where(Probe.id == probe["id"]).values(
            status="succeeded", result={"lr_min": 1e-6, "lr_max": 1.0, "steps_run": 3, "curve": [],
                                        "steepest_lr": 0.01, "divergence_lr": 0.5,
                                        "recommended": {"field": "training.lr", "value": 0.01}}))
        db.session.commit()
    polled = client.get(f"{url}/{probe['id']}", headers=auth)
    assert polled.status_code == 200 and polled.json["result"]["recommended"] == {"field": "training.lr", "value": 0.01}
    assert client.post(url, json={}, headers=auth).status_code == 202
    assert client.post(url, json={}, headers=auth).status_code == 202
    capped = client.post(url, json={}, headers=auth)
    assert capped.status_code == 429 and capped.json["error"]["details"]["limit"] == 2


def test_probe_validation_and_ownership(client: FlaskClient, auth: dict[str, str], make_auth: Any,
                                        job: dict[str, Any]) -> None:
    url = f"/v1/jobs/{job['id']}/probes"
    for body, path in (({"lr_min": 0}, "lr_min"), ({"lr_min": 1.0, "lr_max": 0.5}, "lr_max"),
                       ({"steps": 5}, "steps"), ({"extra": 1}, "extra")):
        response = client.post(url, json=body, headers=auth)
        assert response.status_code == 422 and path in response.json["error"]["details"], body
    assert client.post(url, json={}, headers=make_auth("other")).status_code == 404
    assert client.get(f"{url}/prb_{'0' * 24}", headers=auth).status_code == 404


def test_probe_needs_the_dataset(client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/datasets/{job['dataset_id']}", headers=auth).status_code in (200, 204)
    response = client.post(f"/v1/jobs/{job['id']}/probes", json={}, headers=auth)
    assert response.status_code == 409 and "dataset" in response.json["error"]["message"]
