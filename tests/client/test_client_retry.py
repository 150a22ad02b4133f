"""`Client.retry`, `stabletrain retry` and `stabletrain events` (spike attribution) against the real API
over HTTP; the parent's final state, diagnosis and events are written through the API's models."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from app.extensions import db
from app.models import Event, Job
from stabletrain import ApiError, Client
from tests.client.conftest import run_cli

MakeClient = Callable[..., Client]
TEXT = "the quick brown fox jumps over the lazy dog. " * 200
SPEC = {"name": "c", "model": {"arch": "mlp", "activation": "sigmoid"}, "training": {"max_steps": 10, "seq_len": 16}}
VANISHING = {"kind": "vanishing", "severity": "critical", "summary": "early layers starve", "recommendations": [
    {"field": "model.activation", "value": "relu", "why": "no saturation"},
    {"field": "model.norm", "value": "batchnorm", "why": "keeps pre-activations centred"}]}
SPIKE = {"policy": "rollback", "rule": "grad_norm", "value": 412.5, "median": 1.25, "factor": 330.0,
         "attribution": {"offsets": list(range(0, 20 * 64, 64)),
                         "top": [{"offset": 640, "loss": 9.125, "excerpt": "zzzz\nqqqq"},
                                 {"offset": 128, "loss": 4.5, "excerpt": "the quick"}]}}


def finished_job(app: Flask, client: Client, findings: list[dict[str, Any]]) -> dict[str, Any]:
    """A submitted job, then succeeded with `findings` as its diagnosis (as the worker stores it)."""
    job = client.submit(SPEC, dataset_id=client.upload_text(TEXT)["id"])
    with app.app_context():
        row = db.session.get(Job, job["id"])
        row.status, row.diagnosis = "succeeded", {"findings": findings, "summary": "x"}
        db.session.commit()
    return job


@pytest.fixture
def cli_env(api_url: str, api_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STABLETRAIN_URL", api_url)
    monkeypatch.setenv("STABLETRAIN_API_KEY", api_key)


def test_client_retry_applies_and_reports(app: Flask, api_url: str, api_key: str, make_client: MakeClient) -> None:
    client = make_client(api_url, api_key)
    parent = finished_job(app, client, [VANISHING])
    child = client.retry(parent["id"], apply=["vanishing"], overrides={"training.max_steps": 20},
                         idempotency_key="r1")
    assert child["parent_id"] == parent["id"] and child["status"] == "queued"
    assert child["spec"]["model"]["activation"] == "relu" and child["spec"]["training"]["max_steps"] == 20
    assert client.retry(parent["id"], apply=["vanishing"], idempotency_key="r1")["id"] == child["id"]
    assert client.job(parent["id"])["children"] == [child["id"]]
    with pytest.raises(ApiError) as err:
        client.retry(parent["id"], apply=["exploding"])
    assert err.value.status == 409 and err.value.details["findings"] == ["vanishing"]


def test_cli_retry_prints_the_new_job_and_its_patch(app: Flask, api_url: str, api_key: str,
                                                    make_client: MakeClient, cli_env: None) -> None:
    parent = finished_job(app, make_client(api_url, api_key), [VANISHING])
    res = run_cli("retry", parent["id"], "--apply", "--set", "training.max_steps=20", "--set", "name=again")
    assert res.rc == 0, res
    head, *patch = res.out.strip().splitlines()
    assert head.startswith(f"retried {parent['id']} as job_") and head.endswith("(queued)")
    assert [line.split() for line in patch] == [
        ["model.activation", "=", '"relu"', "(vanishing)"],
        ["model.norm", "=", '"batchnorm"', "(vanishing)"],
        ["name", "=", '"again"', "(override)"],
        ["training.max_steps", "=", "20", "(override)"],
    ]
    child_id = head.split()[3]
    child = make_client(api_url, api_key).job(child_id)
    assert child["parent_id"] == parent["id"] and child["name"] == "again" and child["progress"]["max_steps"] == 20

    res = run_cli("retry", parent["id"], "--apply", "exploding")
    assert res.rc == 3 and res.err.startswith("error 409 conflict:") and "exploding" in res.err
    res = run_cli("retry", parent["id"], "--set", "training.max_steps=0")
    assert res.rc == 3 and res.err.startswith("error 422 validation_error: training.max_steps:"), res.err
    res = run_cli("retry", parent["id"])
    assert res.rc == 2 and "nothing to change" in res.err
    res = run_cli("retry", parent["id"], "--set", "training.max_steps")
    assert res.rc == 2 and "expected FIELD=VALUE" in res.err
    res = run_cli("--json", "retry", parent["id"], "--set", 'stabilization.clip={"mode": "value"}')
    assert res.rc == 0 and json.loads(res.out)["spec"]["stabilization"]["clip"]["mode"] == "value"


def test_cli_events_show_spike_attribution(app: Flask, api_url: str, api_key: str, make_client: MakeClient,
                                           cli_env: None) -> None:
    job = make_client(api_url, api_key).submit(SPEC, dataset_id=make_client(api_url, api_key).upload_text(TEXT)["id"])
    with app.app_context():
        db.session.add_all([
            Event(job_id=job["id"], step=0, kind="started", message="training started", data={"device": "cpu"}),
            Event(job_id=job["id"], step=57, kind="grad_norm_spike", message="grad norm spike", data=SPIKE),
            Event(job_id=job["id"], step=58, kind="loss_spike", message="loss spike", data=None),
        ])
        db.session.commit()
    res = run_cli("events", job["id"])
    assert res.rc == 0, res
    lines = res.out.splitlines()
    assert len(lines) == 8 and "started" in lines[0] and "device" not in lines[0]
    assert "step     57  grad_norm_spike" in lines[1]
    assert lines[2].split() == ["grad_norm", "412.5", "=", "330x", "the", "median", "1.25", "(policy", "rollback)"]
    offsets = " ".join(str(o) for o in range(0, 16 * 64, 64))
    assert lines[3].strip() == f"batch rows at token offsets: {offsets} ... (4 more)"
    assert lines[4].strip() == "highest-loss rows:"
    assert lines[5].split() == ["offset", "640", "loss", "9.125", '"zzzz\\nqqqq"']
    assert lines[6].split() == ["offset", "128", "loss", "4.5", '"the', 'quick"']
    assert "step     58  loss_spike" in lines[7]  # no data: nothing below it
    res = run_cli("--json", "events", job["id"])
    assert json.loads(res.out)[1]["data"] == SPIKE
