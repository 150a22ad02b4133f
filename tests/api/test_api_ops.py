"""Health, readiness, Prometheus, docs, OpenAPI, error envelope and rate limits."""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.logs import JsonFormatter


def test_healthz_readyz(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_a_storage_folder_it_cannot_make(app: Flask, client: FlaskClient, tmp_path: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    app.config["STORAGE_DIR"] = str(blocker / "storage")  # read per request
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["error"]["details"]["storage"] == "down: not writable"  # no path to an anonymous caller
    assert response.json["error"]["details"]["database"] == "ok"
    app.config["STORAGE_URL"] = "gs://not-a-bucket-url"  # a store that cannot even be built: 503, not 500
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json["error"]["details"]["storage"] == "down: ValueError"


@pytest.mark.app_config(BROKER_URL="redis://127.0.0.1:1/0")
def test_readyz_names_the_broker(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    error = response.json["error"]
    assert error["code"] == "unavailable" and "broker" in error["message"]
    assert error["details"]["database"] == "ok" and error["details"]["broker"].startswith("down")


def test_prometheus(client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    client.get("/v1/jobs", headers=auth)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'stabletrain_jobs{status="queued"} 1.0' in text
    assert 'stabletrain_http_requests_total{endpoint="jobs.Jobs",method="GET",status="200"}' in text
    assert "stabletrain_http_request_seconds_bucket" in text


def test_docs_and_openapi(client: FlaskClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/v1/openapi.json" in docs.get_data(as_text=True)
    assert "cdn" not in docs.get_data(as_text=True).lower()
    spec = client.get("/v1/openapi.json").json
    assert spec["openapi"].startswith("3.") and spec["info"]["title"] == "StableTrain"
    for path in ("/v1/datasets", "/v1/datasets/{dataset_id}", "/v1/jobs", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/pause", "/v1/jobs/{job_id}/resume",
                 "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/metrics/layers",
                 "/v1/jobs/{job_id}/diagnosis", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/checkpoints",
                 "/v1/jobs/{job_id}/checkpoints/{step}/file", "/v1/jobs/{job_id}/samples",
                 "/v1/jobs/{job_id}/samples/{sample_id}"):
        assert path in spec["paths"], path
        for operation in spec["paths"][path].values():
            if isinstance(operation, dict) and "responses" in operation:
                assert operation["summary"] and operation["responses"]
    assert "JobSpec" in spec["components"]["schemas"]
    json.dumps(spec)  # serializable, no NaN


def test_error_envelope(app: Flask, client: FlaskClient, auth: dict[str, str]) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", view_func=boom)
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"
    wrong = client.put("/v1/jobs", headers=auth)
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]
    assert wrong.json["error"]["code"] == "method_not_allowed"
    failed = client.get("/boom")
    assert failed.status_code == 500
    assert failed.json == {"error": {"code": "internal_error", "message": "Internal server error.", "details": {}}}


@pytest.mark.app_config(RATELIMIT_DEFAULT="3/minute")
def test_rate_limit(client: FlaskClient, auth: dict[str, str], make_auth: Any) -> None:
    for _ in range(3):
        assert client.get("/v1/datasets", headers=auth).status_code == 200
    limited = client.get("/v1/datasets", headers=auth)
    assert limited.status_code == 429 and limited.json["error"]["code"] == "rate_limited"
    assert 0 < int(limited.headers["Retry-After"]) <= 60  # the limiter's window (a minute)
    assert client.get("/v1/datasets", headers=make_auth("other")).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_json_log_lines() -> None:
    record = logging.LogRecord("app", logging.WARNING, __file__, 1, "enqueue failed for %s", ("job_1",), None)
    line = JsonFormatter().format(record)
    assert json.loads(line)["message"] == "enqueue failed for job_1" and "\n" not in line


def test_sqlite_uses_wal(app: Flask, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite pragma")
    from sqlalchemy import text

    from app.extensions import db

    with app.app_context(), db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def _redis_url() -> str:
    url = os.environ.get("STABLETRAIN_TEST_REDIS_URL")
    if not url:
        pytest.skip("set STABLETRAIN_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) for Redis checks")
    return url


def test_readyz_with_redis_broker(tmp_path: Any) -> None:
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}", "BROKER_URL": _redis_url(),
                      "STORAGE_DIR": str(tmp_path / "s")})
    response = app.test_client().get("/readyz")
    assert response.status_code == 200, response.json


def test_rate_limit_in_redis(tmp_path: Any) -> None:
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}", "STORAGE_DIR": str(tmp_path / "s"),
                      "BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'b.db'}", "RATELIMIT_DEFAULT": "2/minute",
                      "RATELIMIT_STORAGE_URI": _redis_url(), "RATELIMIT_KEY_PREFIX": f"test-{uuid.uuid4().hex}"})
    client = app.test_client()
    codes = [client.get("/v1/openapi.json").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
