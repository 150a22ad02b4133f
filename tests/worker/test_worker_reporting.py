"""The reporter writes engine callbacks into records idempotently and survives dropped connections."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, create_engine, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from app.auth import hash_secret, new_secret
from app.models import ActivationMetric, ApiKey, Checkpoint, Event, Job, LayerMetric, StepMetric
from app.services.common import without_nonfinite
from tests.worker.jobfactory import make_job
from worker.db import with_retry
from worker.reporting import DbReporter


def step_rows(steps: range, loss: float = 1.0) -> list[dict[str, Any]]:
    return [{"step": s, "loss": loss, "lr": 1e-3, "grad_norm": 2.0, "grad_norm_clipped": 1.0, "clipped": True,
             "nonfinite": False, "skipped": False, "loss_scale": 1.0, "tokens_per_s": 100.0,
             "tokens_seen": 64 * s, "val_loss": None, "time": 1.7e9 + s, "health": "ok"} for s in steps]


def metrics(engine: Engine, job_id: str) -> list[tuple[int, float]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(StepMetric.step, StepMetric.loss).where(StepMetric.job_id == job_id).order_by(StepMetric.step))]


def test_same_batch_twice_gives_one_row_per_step(engine: Engine) -> None:
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)
    batch = step_rows(range(1, 11))
    reporter.on_metrics(batch)
    reporter.on_metrics(batch)
    assert [s for s, _ in metrics(engine, job_id)] == list(range(1, 11))
    with engine.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
    assert (job.step, job.tokens_seen, job.health) == (10, 640, "ok")
    assert job.latest["step"] == 10 and job.latest["loss"] == 1.0


def test_resumed_run_overwrites_steps_after_checkpoint(engine: Engine) -> None:
    job_id = make_job(engine)
    DbReporter(engine, job_id).on_metrics(step_rows(range(1, 26), loss=1.0))
    DbReporter(engine, job_id).on_metrics(step_rows(range(21, 31), loss=2.0))
    rows = metrics(engine, job_id)
    assert [s for s, _ in rows] == list(range(1, 31))
    assert {loss for s, loss in rows if s > 20} == {2.0} and {loss for s, loss in rows if s <= 20} == {1.0}


def test_nonfinite_values_are_stored_and_latest_stays_valid_json(engine: Engine) -> None:
    job_id = make_job(engine)
    row = step_rows(range(1, 2))[0] | {"loss": math.inf, "grad_norm": math.nan, "nonfinite": True,
                                        "skipped": True, "health": "critical"}
    DbReporter(engine, job_id).on_metrics([row])
    with engine.connect() as conn:
        job = conn.execute(select(Job.latest, Job.health).where(Job.id == job_id)).one()
        stored = conn.execute(select(StepMetric).where(StepMetric.job_id == job_id)).one()
    assert job.latest["loss"] is None and job.latest["grad_norm"] is None
    # health follows the diagnosis only: the engine's per-step state neither sets it nor rides in `latest`
    assert job.health == "ok" and "health" not in job.latest
    assert stored.loss == math.inf and stored.nonfinite and stored.skipped


def test_layer_stats_are_idempotent(engine: Engine) -> None:
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)
    rows = [{"layer": f"layers.{i}.weight", "grad_norm": 0.1 * i, "weight_norm": 1.0, "update_ratio": 1e-3}
            for i in range(3)]
    reporter.on_layer_stats(5, rows)
    reporter.on_layer_stats(5, [r | {"grad_norm": 9.0} for r in rows])
    with engine.connect() as conn:
        stored = conn.execute(select(LayerMetric.layer, LayerMetric.grad_norm).where(LayerMetric.job_id == job_id)
                              .order_by(LayerMetric.layer)).all()
    assert [tuple(r) for r in stored] == [(f"layers.{i}.weight", 9.0) for i in range(3)]


def test_layer_positions_follow_the_engine_order(engine: Engine) -> None:
    """position = index in the engine's list (its depth order), not name order; a resent step keeps them."""
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)
    engine_order = (["tok_emb.weight", "pos_emb.weight"] + [f"blocks.{i}.attn.qkv.weight" for i in (0, 1, 2, 10, 11)]
                    + ["head.weight"])
    assert sorted(engine_order) != engine_order  # name order would not be depth order
    rows = [{"layer": name, "grad_norm": 1.0 + i, "weight_norm": 1.0, "update_ratio": 1e-3}
            for i, name in enumerate(engine_order)]
    reporter.on_layer_stats(5, rows)
    reporter.on_layer_stats(10, rows)
    reporter.on_layer_stats(10, rows)  # the same step again (resumed run): same positions, one row each
    with engine.connect() as conn:
        stored = conn.execute(select(LayerMetric.step, LayerMetric.position, LayerMetric.layer, LayerMetric.grad_norm)
                              .where(LayerMetric.job_id == job_id)
                              .order_by(LayerMetric.step, LayerMetric.position)).all()
    for step in (5, 10):
        assert [(p, name, g) for s, p, name, g in stored if s == step] == [
            (i, name, 1.0 + i) for i, name in enumerate(engine_order)]
    assert len(stored) == 2 * len(engine_order)


def activation_rows(scale: float = 1.0) -> list[dict[str, Any]]:
    """One flush of on_activation_stats as docs/contracts.md shapes it (depth order), with a NaN and an inf."""
    base = {"mean": 0.0, "std": 1.0, "saturated_frac": None, "dead_frac": None, "attn_max_logit": None,
            "attn_entropy": None, "z_lse": None, "grad_time": None, "grad_time_ratio": None}
    return [
        base | {"site": "layers.0.rnn", "kind": "recurrent", "saturated_frac": 0.25 * scale,
                "grad_time": [[0, 1e-6], [16, 1e-4], [32, math.nan], [48, 0.1], [63, 1.0]], "grad_time_ratio": 1e-6},
        base | {"site": "blocks.1.mlp.act", "kind": "relu", "dead_frac": 0.5 * scale, "mean": math.nan},
        base | {"site": "blocks.1.attn", "kind": "attention", "attn_max_logit": 12.5, "attn_entropy": 1.5,
                "std": math.inf},
        base | {"site": "head", "kind": "output", "z_lse": 4.25, "unknown_key": 1},
    ]


def test_activation_stats_are_idempotent_with_positions_and_nonfinite_as_null(engine: Engine) -> None:
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)
    reporter.on_activation_stats(10, activation_rows())
    reporter.on_activation_stats(20, activation_rows())
    reporter.on_activation_stats(10, activation_rows(scale=2.0))  # re-sent flush (resumed run): overwritten
    with engine.connect() as conn:
        stored = conn.execute(select(ActivationMetric).where(ActivationMetric.job_id == job_id)
                              .order_by(ActivationMetric.step, ActivationMetric.position)).all()
    assert [(r.step, r.position, r.site, r.kind) for r in stored] == [
        (s, i, row["site"], row["kind"]) for s in (10, 20) for i, row in enumerate(activation_rows())]
    rnn, relu, attn, head = stored[:4]
    assert rnn.saturated_frac == 0.5 and relu.dead_frac == 1.0  # step 10 holds the second flush
    assert stored[5].dead_frac == 0.5  # step 20 kept the first
    assert rnn.grad_time == [[0, 1e-6], [16, 1e-4], [32, None], [48, 0.1], [63, 1.0]]
    assert rnn.grad_time_ratio == 1e-6 and relu.grad_time is None
    assert relu.mean is None and attn.std is None  # NaN and inf stored as null on both databases
    assert (attn.attn_max_logit, attn.attn_entropy, head.z_lse) == (12.5, 1.5, 4.25)
    assert head.saturated_frac is None and head.dead_frac is None


def test_events_are_appended_in_order(engine: Engine) -> None:
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)
    reporter.on_event({"step": 0, "kind": "started", "message": "go", "data": {"params": 10}})
    reporter.on_event({"step": 3, "kind": "nonfinite", "message": "nan", "data": {"x": math.nan}})
    with engine.connect() as conn:
        events = conn.execute(select(Event.kind, Event.step, Event.data).where(Event.job_id == job_id)
                              .order_by(Event.id)).all()
    assert [(e.kind, e.step) for e in events] == [("started", 0), ("nonfinite", 3)]
    assert events[1].data == {"x": None}


def test_checkpoints_recorded_only_when_file_exists_and_removed_on_prune(engine: Engine, tmp_path: Path) -> None:
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)
    path = tmp_path / "step_10.pt"
    info = {"step": 10, "path": str(path), "bytes": 3, "sha256": "ab" * 32, "val_loss": 2.5, "health": "ok"}
    reporter.on_checkpoint(info)  # file not there yet: nothing recorded

    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id == job_id)).scalar()

    assert count() == 0
    path.write_bytes(b"abc")
    reporter.on_checkpoint(info)
    reporter.on_checkpoint(info | {"val_loss": math.nan})  # a resumed run rewrites the same step
    assert count() == 1
    reporter.on_checkpoint_removed({"step": 10, "path": str(path)})
    assert count() == 0


def test_fenced_reporter_writes_nothing(engine: Engine) -> None:
    job_id = make_job(engine)
    DbReporter(engine, job_id, fenced=lambda: True).on_metrics(step_rows(range(1, 4)))
    assert metrics(engine, job_id) == []


def test_with_retry_retries_transient_errors(engine: Engine) -> None:
    calls: list[int] = []

    def flaky(conn: Any) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "ok"

    sleeps: list[float] = []
    assert with_retry(engine, flaky, deadline_s=10, what="test", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [0.2, 0.4]


def test_reporter_survives_dropped_postgres_connections(engine: Engine) -> None:
    """Kill every server connection of our database (as a restart does); the next batch still lands."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: needs pg_terminate_backend")
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id, retry_s=10)
    reporter.on_metrics(step_rows(range(1, 6)))
    admin = create_engine(engine.url, poolclass=NullPool)  # its own connection, outside the app's pool
    with admin.connect() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    assert killed >= 1
    reporter.on_metrics(step_rows(range(6, 11)))
    assert [s for s, _ in metrics(engine, job_id)] == list(range(1, 11))


def test_json_safe_replaces_nonfinite() -> None:
    assert without_nonfinite({"a": [1.0, math.inf, {"b": -math.inf}], "c": math.nan, "d": "x"}) == {
        "a": [1.0, None, {"b": None}], "c": None, "d": "x"}


def _finding(kind: str, severity: str) -> dict[str, Any]:
    return {"kind": kind, "severity": severity, "summary": kind, "steps": {"first": 1, "last": 2}, "layers": [],
            "evidence": {}, "recommendations": []}


def test_job_health_follows_each_diagnosis(engine: Engine) -> None:
    job_id = make_job(engine)
    reporter = DbReporter(engine, job_id)

    def stored() -> tuple[str, Any]:
        with engine.connect() as conn:
            row = conn.execute(select(Job.health, Job.diagnosis).where(Job.id == job_id)).one()
        return row.health, row.diagnosis

    reporter.on_diagnosis([_finding("vanishing", "critical"), _finding("stalled", "warning")], "two")
    health, diagnosis = stored()
    assert health == "critical" and [f["kind"] for f in diagnosis["findings"]] == ["vanishing", "stalled"]
    reporter.on_metrics(step_rows(range(1, 4)))  # step rows say "ok": the diagnosis' health stays
    assert stored()[0] == "critical"
    reporter.on_diagnosis([_finding("clipping_saturated", "warning")], "one")
    assert stored()[0] == "warning"
    reporter.on_diagnosis([], "healthy")
    assert stored()[0] == "ok"


def test_a_critical_finding_makes_the_api_say_critical_everywhere(engine: Engine, flask_app: Flask) -> None:
    job_id = make_job(engine)
    secret = new_secret()
    with engine.begin() as conn:
        owner = conn.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one()
        conn.execute(update(ApiKey).where(ApiKey.id == owner).values(key_hash=hash_secret(secret)))
    reporter = DbReporter(engine, job_id)
    reporter.on_metrics(step_rows(range(1, 4)))
    reporter.on_diagnosis([_finding("vanishing", "critical")], "[critical] vanishing")
    client = flask_app.test_client()
    headers = {"Authorization": f"Bearer {secret}"}
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).get_json()
    diagnosis = client.get(f"/v1/jobs/{job_id}/diagnosis", headers=headers).get_json()
    listed = client.get("/v1/jobs", headers=headers).get_json()
    assert job["health"] == diagnosis["health"] == "critical"
    assert [j["health"] for j in listed["items"] if j["id"] == job_id] == ["critical"]
    assert "health" not in (job["latest"] or {})
