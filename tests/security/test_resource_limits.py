"""Item 12: per-key resource limits, MAX_LIVE_JOBS queued/running jobs (429) and
MAX_DATASET_BYTES_PER_KEY bytes of datasets (413), with a message that says what to do.

tests/api covers the first refusal of each (test_api_jobs::test_live_job_limit,
test_api_datasets::test_per_key_quota). Here: the limits come from the environment, count only the
key's own live jobs (running and cancelling too), free up when a job is cancelled or a dataset
deleted, leave idempotent replays alone, and hold when requests race (each request holds a lock on
its key's row from the check to the commit).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.models import Dataset, Job
from app.services import datasets as datasets_service
from app.services import jobs as jobs_service


def _live_error(response: Any, limit: int) -> dict[str, Any]:
    assert response.status_code == 429, response.json
    error = response.json["error"]
    assert error["code"] == "rate_limited" and f"limit {limit}" in error["message"], error
    assert "cancel" in error["message"], error
    assert error["details"] == {"live_jobs": limit, "limit": limit}, error
    assert int(response.headers["Retry-After"]) > 0
    return error


def test_live_job_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("STABLETRAIN_MAX_LIVE_JOBS", "1")
    monkeypatch.setenv("STABLETRAIN_MAX_DATASET_BYTES_PER_KEY", "12345")
    from app import create_app

    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}", "STORAGE_DIR": str(tmp_path / "s"),
                      "BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'b.db'}"})
    assert app.config["MAX_LIVE_JOBS"] == 1 and app.config["MAX_DATASET_BYTES_PER_KEY"] == 12345


@pytest.mark.app_config(MAX_LIVE_JOBS=2)
def test_live_jobs_count_per_key_and_free_up(app: Flask, client: FlaskClient, submit: Any, upload: Any,
                                             auth: dict[str, str], make_auth: Any, dataset: dict[str, Any]) -> None:
    first = submit(auth, dataset["id"]).json["id"]
    second = submit(auth, dataset["id"], extra_headers={"Idempotency-Key": "k2"}).json["id"]
    with app.app_context():  # running and cancelling jobs are live too
        db.session.get(Job, first).status = "running"
        db.session.commit()
    assert client.post(f"/v1/jobs/{first}/cancel", headers=auth).json["status"] == "cancelling"
    _live_error(submit(auth, dataset["id"]), 2)
    replay = submit(auth, dataset["id"], extra_headers={"Idempotency-Key": "k2"})
    assert replay.status_code == 200 and replay.json["id"] == second, "a replay is not a new job"
    other = make_auth("other")
    other_ds = upload(other).json["id"]
    assert submit(other, other_ds).status_code == 202, "another key has its own budget"
    assert client.post(f"/v1/jobs/{second}/cancel", headers=auth).json["status"] == "cancelled"
    assert submit(auth, dataset["id"]).status_code == 202, "cancelling a queued job frees its slot"
    with app.app_context():
        db.session.get(Job, first).status = "cancelled"  # the worker stopped it
        db.session.commit()
    assert submit(auth, dataset["id"]).status_code == 202


@pytest.mark.app_config(MAX_DATASET_BYTES_PER_KEY=5000)
def test_dataset_quota_details_and_freeing(client: FlaskClient, upload: Any, auth: dict[str, str]) -> None:
    kept = upload(auth, b"a" * 3000).json
    refused = upload(auth, b"b" * 2500)
    assert refused.status_code == 413
    error = refused.json["error"]
    assert error["code"] == "payload_too_large" and "delete datasets first" in error["message"], error
    assert error["details"] == {"used_bytes": 3000, "quota_bytes": 5000, "upload_bytes": 2500}, error
    assert upload(auth, b"c" * 2000).status_code == 201, "exactly at the quota is allowed"
    assert upload(auth, b"d").status_code == 413
    assert client.delete(f"/v1/datasets/{kept['id']}", headers=auth).status_code == 204
    assert upload(auth, b"b" * 2500).status_code == 201, "deleting a dataset frees its bytes"


def _race(app: Flask, n: int, request: Any) -> list[int]:
    """n requests released together, each from its own thread and test client."""
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def one(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        codes.append(request(client, i).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return sorted(codes)


def _slow(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
    """Widen the window between a limit check and the commit that follows it."""
    real = getattr(module, name)

    def slow(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        time.sleep(0.3)
        return result

    monkeypatch.setattr(module, name, slow)


@pytest.mark.app_config(MAX_LIVE_JOBS=2)
def test_live_job_limit_holds_under_concurrent_submits(app: Flask, auth: dict[str, str], dataset: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _slow(monkeypatch, jobs_service, "_check_live_jobs")
    body = {"dataset_id": dataset["id"], "training": {"max_steps": 10, "seq_len": 16}}
    codes = _race(app, 5, lambda client, _i: client.post("/v1/jobs", json=body, headers=auth))
    assert codes == [202, 202, 429, 429, 429], codes
    with app.app_context():
        assert db.session.query(Job).count() == 2


@pytest.mark.app_config(MAX_DATASET_BYTES_PER_KEY=5000)
def test_dataset_quota_holds_under_concurrent_uploads(app: Flask, auth: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _slow(monkeypatch, datasets_service, "_check_quota")
    headers = {**auth, "Content-Type": "text/plain"}
    codes = _race(app, 4, lambda client, i: client.post("/v1/datasets", data=bytes([97 + i]) * 2000,
                                                        headers=headers))
    assert codes == [201, 201, 413, 413], codes
    with app.app_context():
        assert sum(d.bytes for d in db.session.query(Dataset)) == 4000
