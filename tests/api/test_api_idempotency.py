"""Idempotency-Key, strictly: a replay must repeat the body (else 422 `idempotency_mismatch`), keys are
never cut (over 255 characters: 400; two long keys with the same start stay two keys)."""

from __future__ import annotations

import json
import threading
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.models import Job


def _body(dataset_id: str, **training: Any) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "name": "t", "training": {"max_steps": 10, "seq_len": 16, **training}}


def _post(client: FlaskClient, auth: dict[str, str], key: str, body: Any) -> Any:
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post("/v1/jobs", data=data, headers={**auth, "Idempotency-Key": key,
                                                       "Content-Type": "application/json"})


def _jobs(app: Flask) -> int:
    with app.app_context():
        return db.session.query(Job).count()


def test_replay_with_the_same_body_in_any_key_order(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                    dataset: dict[str, Any]) -> None:
    body = _body(dataset["id"])
    first = _post(client, auth, "k-1", body)
    assert first.status_code == 202
    reordered = f'{{"training": {{"seq_len": 16, "max_steps": 10}}, "name": "t",\n "dataset_id": "{dataset["id"]}"}}'
    again = _post(client, auth, "  k-1 ", reordered)  # surrounding spaces are not part of the key
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json["id"] == first.json["id"] and _jobs(app) == 1


def test_replay_with_another_body_is_refused(app: Flask, client: FlaskClient, auth: dict[str, str],
                                             make_auth: Any, upload: Any, dataset: dict[str, Any]) -> None:
    first = _post(client, auth, "k-2", _body(dataset["id"]))
    changed = _post(client, auth, "k-2", _body(dataset["id"], max_steps=11))
    assert changed.status_code == 422, changed.json
    error = changed.json["error"]
    assert error["code"] == "idempotency_mismatch" and "different request body" in error["message"]
    assert error["details"]["job_id"] == first.json["id"] and "Idempotency-Key" in error["details"]
    assert _jobs(app) == 1
    # the key belongs to one API key: another key may use the same string with its own body
    other = make_auth("other")
    theirs = _post(client, other, "k-2", _body(upload(other).json["id"], max_steps=12))
    assert theirs.status_code == 202 and _jobs(app) == 2


def test_long_keys_are_refused_not_cut(app: Flask, client: FlaskClient, auth: dict[str, str],
                                       dataset: dict[str, Any]) -> None:
    body = _body(dataset["id"])
    too_long = _post(client, auth, "k" * 256, body)
    assert too_long.status_code == 400, too_long.json
    assert too_long.json["error"]["code"] == "bad_request" and "Idempotency-Key" in too_long.json["error"]["details"]
    assert _jobs(app) == 0
    # 255 characters are fine, and two keys sharing their first 254 characters are two keys
    first = _post(client, auth, "a" * 254 + "1", body)
    second = _post(client, auth, "a" * 254 + "2", body)
    assert first.status_code == 202 and second.status_code == 202 and first.json["id"] != second.json["id"]
    again = _post(client, auth, "a" * 254 + "1", body)
    assert again.status_code == 200 and again.json["id"] == first.json["id"]
    assert _post(client, auth, "a" * 254 + "1", _body(dataset["id"], max_steps=9)).status_code == 422
    assert _jobs(app) == 2


def test_concurrent_first_uses_make_one_job(app: Flask, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    """Eight racing first uses of one key: one 202, the same body's others 200 with that job, and the
    other body's 422 (whichever committed first decides)."""
    bodies = [_body(dataset["id"])] * 6 + [_body(dataset["id"], max_steps=11)] * 2
    results: list[tuple[int, Any]] = []
    barrier = threading.Barrier(len(bodies))

    def post(body: dict[str, Any]) -> None:
        barrier.wait()
        response = _post(app.test_client(), auth, "race", body)
        results.append((response.status_code, body["training"]["max_steps"], response.json))

    threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _jobs(app) == 1
    created = [r for r in results if r[0] == 202]
    assert len(created) == 1, results
    winner_steps, job_id = created[0][1], created[0][2]["id"]
    for status, steps, payload in results:
        if steps == winner_steps:
            assert status in (200, 202) and payload["id"] == job_id, (status, payload)
        else:
            assert status == 422 and payload["error"]["code"] == "idempotency_mismatch", (status, payload)
