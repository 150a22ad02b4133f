"""`Client.dry_run`, `Client.probe`, `stabletrain submit --dry-run` and `stabletrain probe` against the
real API over HTTP; the probe's worker side is written through the API's models."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from app.extensions import db
from app.models import DeviceCalibration, Job, Probe, utcnow
from stabletrain import ApiError, Client
from tests.client.conftest import run_cli

MakeClient = Callable[..., Client]
TEXT = "the quick brown fox jumps over the lazy dog. " * 200
SPEC = {"name": "c", "model": {"arch": "gru", "n_layers": 1, "d_model": 16, "hidden": 32},
        "training": {"max_steps": 10, "seq_len": 16, "batch_size": 4, "optimizer": "sgd"}}
RESULT = {"lr_min": 1e-6, "lr_max": 10.0, "steps_run": 80, "curve": [{"lr": 1e-6, "loss": 5.5, "smoothed": 5.5}],
          "steepest_lr": 0.02, "divergence_lr": 0.9, "min_loss_lr": 0.2, "min_smoothed_loss": 2.0,
          "recommended": {"field": "training.lr", "value": 0.02}}


@pytest.fixture
def cli_env(api_url: str, api_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STABLETRAIN_URL", api_url)
    monkeypatch.setenv("STABLETRAIN_API_KEY", api_key)


def _jobs(app: Flask) -> int:
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(Job)).scalar_one()


def test_client_dry_run(app: Flask, api_url: str, api_key: str, make_client: MakeClient) -> None:
    client = make_client(api_url, api_key)
    dataset = client.upload_text(TEXT)["id"]
    with app.app_context():
        db.session.add(DeviceCalibration(device_class="cpu:x", flops_per_s=1e9, details={}, measured_at=utcnow()))
        db.session.commit()
    est = client.dry_run(SPEC, dataset_id=dataset)
    # gru: embedding 256x16, 3 gates x (16x32 + 32x32 + 2x32), head 32x256 + 256
    assert est["params"] == 256 * 16 + 3 * (16 * 32 + 32 * 32 + 64) + 32 * 256 + 256
    assert est["memory"]["optimizer_bytes"] == 4 * est["params"]  # sgd momentum 0.9: one buffer
    assert est["tokens"] == 10 * 4 * 16 and est["estimated_wall_s"] == est["flops"] / 1e9
    with pytest.raises(ApiError) as bad:
        client.dry_run({**SPEC, "training": {"seq_len": 1}}, dataset_id=dataset)
    assert bad.value.status == 422 and "training.seq_len" in bad.value.details
    assert _jobs(app) == 0


def test_cli_submit_dry_run(app: Flask, api_url: str, api_key: str, make_client: MakeClient, cli_env: None,
                            tmp_path: Any) -> None:
    dataset = make_client(api_url, api_key).upload_text(TEXT)["id"]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    text = run_cli("submit", str(spec_file), "--dataset", dataset, "--dry-run")
    assert text.rc == 0, text.err
    assert "parameters   " in text.out and "wall time    unknown (no training worker" in text.out
    as_json = run_cli("--json", "submit", str(spec_file), "--dataset", dataset, "--dry-run")
    assert as_json.rc == 0 and json.loads(as_json.out)["tokens"] == 640
    assert _jobs(app) == 0


def _finish_on_first_poll(app: Flask, client: Client, result: dict[str, Any] | None, error: str | None) -> None:
    """The client's first wait marks every queued probe done, as a worker would."""
    client._sleep = lambda _: _mark(app, result, error)


def test_client_probe_polls_until_done(app: Flask, api_url: str, api_key: str, make_client: MakeClient) -> None:
    client = make_client(api_url, api_key)
    job = client.submit(SPEC, dataset_id=client.upload_text(TEXT)["id"])
    _finish_on_first_poll(app, client, RESULT, None)
    probe = client.probe(job["id"], lr_min=1e-6, steps=80)
    assert probe["status"] == "succeeded" and probe["params"]["lr_min"] == 1e-6 and probe["params"]["steps"] == 80
    assert probe["result"]["recommended"] == {"field": "training.lr", "value": 0.02}


def test_cli_probe(app: Flask, api_url: str, api_key: str, make_client: MakeClient, cli_env: None,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client(api_url, api_key)
    job = client.submit(SPEC, dataset_id=client.upload_text(TEXT)["id"])
    monkeypatch.setattr("stabletrain.client.time.sleep", lambda s: _mark(app, RESULT, None))
    out = run_cli("probe", job["id"], "--steps", "80")
    assert out.rc == 0, out.err
    assert "steepest descent lr  0.02" in out.out and "divergence lr        0.9" in out.out
    assert f"stabletrain retry {job['id']} --set training.lr=0.02" in out.out
    monkeypatch.setattr("stabletrain.client.time.sleep", lambda s: _mark(app, None, "dataset missing"))
    failed = run_cli("probe", job["id"])
    assert failed.rc == 1 and "failed: dataset missing" in failed.out


def _mark(app: Flask, result: dict[str, Any] | None, error: str | None) -> None:
    with app.app_context():
        db.session.execute(Probe.__table__.update().where(Probe.status == "queued").values(
            status="failed" if error else "succeeded", result=result, error=error, finished_at=utcnow()))
        db.session.commit()
