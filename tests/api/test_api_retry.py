"""POST /v1/jobs/{id}/retry: recommendations and overrides applied to a finished job's spec, the
child's lineage, validation, idempotency and limits like a normal submission; migration 0005."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flask_migrate
import pytest
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection
from sqlalchemy import inspect, text

from app.extensions import db
from app.models import Job
from tests.api.test_api_migrations import _app, _assert_no_diff, insert_key_and_job


def _rec(field: str, value: Any) -> dict[str, Any]:
    return {"field": field, "value": value, "why": "because"}


VANISHING = {"kind": "vanishing", "severity": "critical", "summary": "early layers starve",
             "recommendations": [_rec("model.norm", "layernorm"), _rec("model.init", "kaiming_normal"),
                                 _rec("model.n_layers", 1)]}
EXPLODING = {"kind": "exploding", "severity": "critical", "summary": "grad norm blew up",
             "recommendations": [_rec("stabilization.clip", {"mode": "norm", "max_norm": 0.25}),
                                 _rec("training.lr", 0.0003)]}
STALLED = {"kind": "stalled", "severity": "warning", "summary": "loss flat",
           "recommendations": [_rec("model.norm", "rmsnorm"), _rec("stabilization.clip.max_norm", 5.0),
                               _rec("training.warmup_steps", 5)]}


def finish(app: Flask, job_id: str, status: str = "succeeded", findings: list[dict[str, Any]] | None = None) -> None:
    """Put a submitted job in a final state with a stored diagnosis (as the worker writes it)."""
    with app.app_context():
        job = db.session.get(Job, job_id)
        job.status = status
        if findings is not None:
            job.diagnosis = {"findings": findings, "summary": "; ".join(f.get("summary", "") for f in findings)}
        db.session.commit()


@pytest.fixture
def retry(client: FlaskClient) -> Any:
    """Factory: POST /v1/jobs/{id}/retry."""

    def do(headers: dict[str, str], job_id: str, apply: Any = "recommendations", **body: Any) -> Any:
        extra = body.pop("extra_headers", {})
        return client.post(f"/v1/jobs/{job_id}/retry", json={"apply": apply, **body}, headers={**headers, **extra})

    return do


@pytest.fixture
def diagnosed(app: Flask, job: dict[str, Any]) -> dict[str, Any]:
    """The `job` fixture, succeeded, diagnosed exploding (most severe first), vanishing and stalled."""
    finish(app, job["id"], findings=[EXPLODING, VANISHING, STALLED])
    return job


def test_retry_applies_every_recommendation_most_severe_first(client: FlaskClient, retry: Any, auth: dict[str, str],
                                                              diagnosed: dict[str, Any]) -> None:
    response = retry(auth, diagnosed["id"])
    assert response.status_code == 202, response.json
    child = response.json
    assert child["status"] == "queued" and child["parent_id"] == diagnosed["id"] and child["children"] == []
    spec, parent_spec = child["spec"], diagnosed["spec"]
    # the dict value merged into the clip section: the other clip settings are the parent's
    assert spec["stabilization"]["clip"] == {**parent_spec["stabilization"]["clip"], "mode": "norm", "max_norm": 0.25}
    assert spec["training"]["lr"] == 0.0003 and spec["training"]["warmup_steps"] == 5
    # vanishing's layernorm beats stalled's rmsnorm; stalled's clip.max_norm lies inside exploding's clip: skipped
    assert spec["model"]["norm"] == "layernorm" and spec["model"]["init"] == "kaiming_normal"
    assert spec["model"]["n_layers"] == 1 and spec["dataset_id"] == parent_spec["dataset_id"]
    assert child["applied_patch"] == [
        {"field": "stabilization.clip", "value": {"mode": "norm", "max_norm": 0.25}, "from_finding": "exploding"},
        {"field": "training.lr", "value": 0.0003, "from_finding": "exploding"},
        {"field": "model.norm", "value": "layernorm", "from_finding": "vanishing"},
        {"field": "model.init", "value": "kaiming_normal", "from_finding": "vanishing"},
        {"field": "model.n_layers", "value": 1, "from_finding": "vanishing"},
        {"field": "training.warmup_steps", "value": 5, "from_finding": "stalled"},
    ]
    parent = client.get(f"/v1/jobs/{diagnosed['id']}", headers=auth).json
    assert parent["children"] == [child["id"]] and parent["parent_id"] is None and parent["applied_patch"] is None
    again = client.get(f"/v1/jobs/{child['id']}", headers=auth).json
    assert again["parent_id"] == diagnosed["id"] and again["applied_patch"] == child["applied_patch"]
    listed = client.get("/v1/jobs", headers=auth).json["items"]
    assert {j["id"]: j["parent_id"] for j in listed} == {child["id"]: diagnosed["id"], diagnosed["id"]: None}


def test_retry_of_chosen_kinds_with_overrides(retry: Any, auth: dict[str, str], diagnosed: dict[str, Any]) -> None:
    response = retry(auth, diagnosed["id"], ["stalled"],
                     overrides={"training.max_steps": 40, "model.norm": "layernorm", "name": "second try"})
    assert response.status_code == 202, response.json
    child = response.json
    # stalled's norm is replaced by the override: only the override is recorded for that field
    assert child["applied_patch"] == [
        {"field": "stabilization.clip.max_norm", "value": 5.0, "from_finding": "stalled"},
        {"field": "training.warmup_steps", "value": 5, "from_finding": "stalled"},
        {"field": "model.norm", "value": "layernorm", "from_finding": None},  # overrides in path order
        {"field": "name", "value": "second try", "from_finding": None},
        {"field": "training.max_steps", "value": 40, "from_finding": None},
    ]
    assert child["spec"]["model"]["norm"] == "layernorm" and child["spec"]["model"]["n_layers"] == 2
    assert child["spec"]["stabilization"]["clip"]["max_norm"] == 5.0 and child["spec"]["training"]["lr"] == 1e-3
    assert child["name"] == "second try" and child["progress"]["max_steps"] == 40


def test_override_inside_a_recommended_section_keeps_both(retry: Any, auth: dict[str, str],
                                                          diagnosed: dict[str, Any]) -> None:
    child = retry(auth, diagnosed["id"], ["exploding"], overrides={"stabilization.clip.max_norm": 2.0}).json
    assert [c["field"] for c in child["applied_patch"]] == ["stabilization.clip", "training.lr",
                                                            "stabilization.clip.max_norm"]
    assert child["spec"]["stabilization"]["clip"]["mode"] == "norm"
    assert child["spec"]["stabilization"]["clip"]["max_norm"] == 2.0


def test_the_child_is_sent_to_the_workers(app: Flask, retry: Any, auth: dict[str, str],
                                          diagnosed: dict[str, Any]) -> None:
    child_id = retry(auth, diagnosed["id"]).json["id"]
    sent = []
    with Connection(app.config["BROKER_URL"]) as conn:
        queue = conn.SimpleQueue("train")
        for _ in range(2):  # the parent's message (from its submission), then the child's
            message = queue.get(timeout=5)
            sent.append(message.payload[0] if isinstance(message.payload, list) else json.loads(message.body)[0])
            message.ack()
        queue.close()
    assert sent == [[diagnosed["id"]], [child_id]]


@pytest.mark.parametrize("status", ["queued", "running", "cancelling"])
def test_live_parent_is_409(app: Flask, retry: Any, auth: dict[str, str], job: dict[str, Any], status: str) -> None:
    finish(app, job["id"], status, [VANISHING])
    response = retry(auth, job["id"])
    assert response.status_code == 409 and status in response.json["error"]["message"]
    assert response.json["error"]["details"] == {"status": status}


def test_nothing_to_apply_is_409(app: Flask, retry: Any, auth: dict[str, str], job: dict[str, Any]) -> None:
    finish(app, job["id"], "cancelled")  # cancelled before it ran: no diagnosis
    none = retry(auth, job["id"])
    assert none.status_code == 409 and "no recommendations" in none.json["error"]["message"]
    finish(app, job["id"], "failed", [VANISHING])
    missing = retry(auth, job["id"], ["vanishing", "exploding"])
    assert missing.status_code == 409
    assert missing.json["error"]["details"] == {"apply": ["exploding"], "findings": ["vanishing"]}
    # apply [] is a rerun with the overrides only: allowed without a diagnosis
    finish(app, job["id"], "cancelled", [])
    rerun = retry(auth, job["id"], [], overrides={"training.seed": 7})
    assert rerun.status_code == 202, rerun.json
    assert rerun.json["applied_patch"] == [{"field": "training.seed", "value": 7, "from_finding": None}]


def _details(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 422, response.json
    return response.json["error"]["details"]


def test_invalid_patched_spec_names_the_field(app: Flask, retry: Any, auth: dict[str, str],
                                              diagnosed: dict[str, Any]) -> None:
    assert "training.max_steps" in _details(retry(auth, diagnosed["id"], [], overrides={"training.max_steps": 0}))
    assert "training.max_stepz" in _details(retry(auth, diagnosed["id"], [], overrides={"training.max_stepz": 5}))
    assert "model.n_layers.deep" in _details(retry(auth, diagnosed["id"], [], overrides={"model.n_layers.deep": 5}))
    over_limit = retry(auth, diagnosed["id"], [], overrides={"training.max_steps": 10**7})
    assert "training.max_steps" in _details(over_limit) and "on this server" in over_limit.json["error"]["message"]
    # a recommendation this spec cannot take is a 422 too (a string lr from a diagnosis of a non-finite lr)
    finish(app, diagnosed["id"], findings=[{"kind": "odd", "recommendations": [_rec("training.lr", "x0.3")]}])
    assert "training.lr" in _details(retry(auth, diagnosed["id"]))
    assert "apply" in _details(retry(auth, diagnosed["id"], "everything"))
    assert "apply" in _details(retry(auth, diagnosed["id"], [1]))
    assert "overrides.Bad Path.key" in _details(retry(auth, diagnosed["id"], [], overrides={"Bad Path": 1}))
    assert "extra" in _details(retry(auth, diagnosed["id"], [], extra=1))
    with app.app_context():
        assert db.session.query(Job).count() == 1  # nothing was made


def test_deleted_dataset_is_422(client: FlaskClient, retry: Any, auth: dict[str, str],
                                diagnosed: dict[str, Any]) -> None:
    assert client.delete(f"/v1/datasets/{diagnosed['dataset_id']}", headers=auth).status_code == 204
    assert "dataset_id" in _details(retry(auth, diagnosed["id"]))


def test_idempotency_key_replays_the_child(app: Flask, retry: Any, auth: dict[str, str],
                                           diagnosed: dict[str, Any]) -> None:
    first = retry(auth, diagnosed["id"], extra_headers={"Idempotency-Key": "retry-1"})
    again = retry(auth, diagnosed["id"], extra_headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true" and again.json["id"] == first.json["id"]
    with app.app_context():
        assert db.session.query(Job).filter(Job.parent_id == diagnosed["id"]).count() == 1


@pytest.mark.app_config(MAX_LIVE_JOBS=2)
def test_live_job_limit_applies(submit: Any, retry: Any, auth: dict[str, str], diagnosed: dict[str, Any]) -> None:
    assert submit(auth, diagnosed["dataset_id"]).status_code == 202
    assert retry(auth, diagnosed["id"]).status_code == 202
    third = retry(auth, diagnosed["id"])
    assert third.status_code == 429 and "limit 2" in third.json["error"]["message"]


def test_another_keys_job_is_404(retry: Any, make_auth: Any, diagnosed: dict[str, Any]) -> None:
    assert retry(make_auth("other"), diagnosed["id"]).status_code == 404


def test_openapi_documents_the_route(client: FlaskClient) -> None:
    spec = client.get("/v1/openapi.json").json
    operation = spec["paths"]["/v1/jobs/{job_id}/retry"]["post"]
    assert {"200", "202", "404", "409", "422"} <= set(operation["responses"])
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RetryRequest"}
    request_schema = spec["components"]["schemas"]["RetryRequest"]
    assert request_schema["required"] == ["apply"] and request_schema["additionalProperties"] is False
    job = spec["components"]["schemas"]["Job"]["properties"]
    assert {"parent_id", "applied_patch", "children"} <= set(job)
    entry = spec["components"]["schemas"]["PatchEntry"]["properties"]
    assert set(entry) == {"field", "value", "from_finding"}


# -- migration 0005 -----------------------------------------------------------------------------

def _job_columns() -> set[str]:
    with db.engine.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("jobs")}


def _round_trip_lineage(database_url: str, tmp_path: Path) -> None:
    """0005's parent: a job with a metric row -> 0005 (rows kept, lineage null) -> a child row ->
    back (columns and index gone, every row kept, metrics too) -> head again (no diff to the models)."""
    app = _app(database_url, tmp_path)
    with app.app_context():
        flask_migrate.upgrade(revision="0005-1")
        assert "parent_id" not in _job_columns()
        with db.engine.begin() as conn:
            insert_key_and_job(conn)
            conn.execute(text("INSERT INTO layer_metrics (job_id, step, layer, grad_norm) VALUES "
                              "('job_1', 10, 'head.weight', 0.5)"))

        flask_migrate.upgrade(revision="0005")
        assert {"parent_id", "applied_patch"} <= _job_columns()
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT parent_id, applied_patch FROM jobs")).one() == (None, None)
            conn.execute(text("INSERT INTO jobs (id, owner_id, name, spec, status, created_at, updated_at, step, "
                              "max_steps, tokens_seen, health, attempts, cancel_requested, parent_id, "
                              "applied_patch) VALUES ('job_2', 'key_1', 'j', '{}', 'queued', CURRENT_TIMESTAMP, "
                              "CURRENT_TIMESTAMP, 0, 10, 0, 'ok', 0, false, 'job_1', '[]')"))

        flask_migrate.downgrade(revision="0005-1")
        assert not {"parent_id", "applied_patch"} & _job_columns()
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM jobs ORDER BY id")).scalars().all() == ["job_1", "job_2"]
            assert conn.execute(text("SELECT count(*) FROM layer_metrics")).scalar_one() == 1

        flask_migrate.upgrade()
        _assert_no_diff()
        with db.engine.connect() as conn:
            assert "ix_jobs_parent_id" in {i["name"] for i in inspect(conn).get_indexes("jobs")}
        flask_migrate.downgrade(revision="base")
        db.engine.dispose()


def test_lineage_migration_round_trip_on_sqlite(tmp_path: Path) -> None:
    _round_trip_lineage(f"sqlite:///{tmp_path / 'round.db'}", tmp_path)


def test_lineage_migration_round_trip_on_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _round_trip_lineage(request.getfixturevalue("fresh_postgres_url"), tmp_path)


def test_retry_resets_the_fields_a_recommendation_made_meaningless(app: Flask, submit: Any, retry: Any,
                                                                    auth: dict[str, str],
                                                                    dataset: dict[str, Any]) -> None:
    parent = submit(auth, dataset["id"], model={"arch": "mlp", "init": "normal", "init_std": 0.05}).json
    vanishing = {"kind": "vanishing", "severity": "critical", "summary": "s",
                 "recommendations": [_rec("model.init", "kaiming_normal")]}
    finish(app, parent["id"], findings=[vanishing])
    response = retry(auth, parent["id"])
    assert response.status_code == 202, response.json
    child = response.json
    assert child["spec"]["model"]["init"] == "kaiming_normal" and child["spec"]["model"]["init_std"] == 0.02
    assert child["applied_patch"] == [
        {"field": "model.init", "value": "kaiming_normal", "from_finding": "vanishing"},
        {"field": "model.init_std", "value": 0.02, "from_finding": "vanishing"},
    ]
    # an override that keeps the meaningless value is the user's own choice: refused, naming the field
    refused = retry(auth, parent["id"], overrides={"model.init_std": 0.05})
    assert refused.status_code == 422 and "model.init_std" in refused.json["error"]["details"]
