"""/metrics: one scrape sees every gunicorn worker; no tenant in any label; the optional operator token."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from app.extensions import db
from tests.ops.helpers import BIN, REPO, free_port, get, stop_group
from worker.testing import wait_for

HEALTHZ_REQUESTS = 40


def request_count(exposition: str, endpoint: str) -> float:
    """stabletrain_http_requests_total for GET `endpoint` with status 200."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if (sample.name == "stabletrain_http_requests_total" and sample.labels.get("endpoint") == endpoint
                    and sample.labels.get("status") == "200"):
                return sample.value
    return 0.0


def stale_counter_file(folder: Path) -> None:
    """A counter file as an earlier server run would have left it: 1000 /healthz requests."""
    folder.mkdir(parents=True)
    stale = MmapedDict(str(folder / "counter_999999.db"))
    key = mmap_key("stabletrain_http_requests", "stabletrain_http_requests_total", ["method", "endpoint", "status"],
                   ["GET", "ops.healthz", "200"], "HTTP requests")
    stale.write_value(key, 1000.0, 0.0)
    stale.close()


def test_one_scrape_counts_the_requests_of_every_worker(tmp_path: Path) -> None:
    """Two workers, each replaced after 5 requests (--max-requests): 40 requests are served by at least
    8 worker processes, most of them gone by the scrape, and one scrape of one worker counts all 40."""
    database = f"sqlite:///{tmp_path / 'api.db'}"
    app = __import__("app").create_app({"DATABASE_URL": database, "STORAGE_DIR": str(tmp_path / "storage"),
                                        "BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}"})
    with app.app_context():
        db.create_all()
        db.engine.dispose()
    metrics_dir = tmp_path / "prometheus"
    stale_counter_file(metrics_dir)
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "STABLETRAIN_DATABASE_URL": database,
           "STABLETRAIN_BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}",
           "STABLETRAIN_STORAGE_DIR": str(tmp_path / "storage"), "STABLETRAIN_LOG_LEVEL": "WARNING"}
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - the child writes it
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "--config", str(REPO / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{port}",
         "--workers", "2", "--max-requests", "5", "--no-control-socket", "app:create_app()"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(f"{base}/readyz", timeout_s=5)[0] == 200, 120, "gunicorn to answer /readyz")
        served = 0
        for _ in range(HEALTHZ_REQUESTS):  # a worker being replaced refuses nothing: the other one answers
            served += wait_for(lambda: get(f"{base}/healthz")[0] == 200, 60, "a /healthz answer")
        status, exposition = get(f"{base}/metrics")
        assert status == 200, exposition
        assert served == HEALTHZ_REQUESTS
        assert request_count(exposition, "ops.healthz") == HEALTHZ_REQUESTS  # the stale 1000 was cleared
        writers = {path.name for path in metrics_dir.glob("counter_*.db")}
        assert len(writers) >= HEALTHZ_REQUESTS // 5, writers  # the requests really were spread out
        assert 'stabletrain_jobs{status="queued"} 0.0' in exposition
    finally:
        stop_group(server)
        log.close()
    assert server.returncode == 0, (tmp_path / "gunicorn.log").read_text()[-3000:]


def test_no_label_names_a_tenant(client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    """Tenant data never reaches a label: endpoints are route names, never URLs with ids or keys."""
    for url in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/metrics", f"/v1/datasets/{job['dataset_id']}"):
        assert client.get(url, headers=auth).status_code == 200
    samples = [sample for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
               for sample in family.samples]
    assert {name for sample in samples for name in sample.labels} <= {"method", "endpoint", "status", "le"}
    values = {value for sample in samples for value in sample.labels.values()}
    assert "jobs.JobById" in values, values
    assert not [v for v in values if v.startswith(("job_", "ds_", "key_", "st_", "/"))], values


@pytest.mark.app_config(METRICS_TOKEN="operator-secret")
def test_operator_token_guards_metrics(app: Flask, client: FlaskClient, auth: dict[str, str]) -> None:
    denied = client.get("/metrics")
    assert denied.status_code == 401 and denied.json["error"]["code"] == "unauthorized"
    assert denied.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers=auth).status_code == 401  # an API key is not the operator token
    allowed = client.get("/metrics", headers={"Authorization": "Bearer operator-secret"})
    assert allowed.status_code == 200 and "stabletrain_jobs" in allowed.get_data(as_text=True)
    assert client.get("/healthz").status_code == 200  # the other operational routes stay open


def test_metrics_open_without_a_token(client: FlaskClient) -> None:
    assert client.get("/metrics").status_code == 200
