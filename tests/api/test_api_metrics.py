"""Metrics paging and downsampling, layer stats, events, diagnosis."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import insert, text

from app.extensions import db
from app.models import Event, Job, LayerMetric, StepMetric
from app.services import metrics as metrics_service
from app.services.cursors import RowKey
from tests.api.listing_seed import follow

N_STEPS = 10_000
SPIKE_LOSS_STEP, SPIKE_GRAD_STEP, NAN_STEP, SKIP_STEP = 3333, 7777, 5000, 6001


def _row(job_id: str, step: int) -> dict[str, Any]:
    loss = 3.0 - step * 1e-4 + 0.01 * math.sin(step)
    grad = 1.0 + 0.1 * math.cos(step)
    row = {"job_id": job_id, "step": step, "loss": loss, "lr": 1e-3, "grad_norm": grad,
           "grad_norm_clipped": min(grad, 1.0), "clipped": grad > 1.0, "nonfinite": False, "skipped": False,
           "loss_scale": None, "tokens_per_s": 1000.0, "tokens_seen": step * 256, "val_loss": None,
           "time": 1.7e9 + step}
    if step == SPIKE_LOSS_STEP:
        row["loss"] = 50.0
    if step == SPIKE_GRAD_STEP:
        row["grad_norm"] = 1e6
    if step == NAN_STEP:
        row.update(loss=float("nan"), grad_norm=float("inf"), nonfinite=True, skipped=True)
    if step == SKIP_STEP:
        row["skipped"] = True
    return row


def _fill(app: Flask, job_id: str) -> None:
    with app.app_context():
        db.session.execute(insert(StepMetric), [_row(job_id, s) for s in range(1, N_STEPS + 1)])
        db.session.commit()


def test_metrics_paging(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    _fill(app, job["id"])
    url = f"/v1/jobs/{job['id']}/metrics"
    first = client.get(f"{url}?limit=1000", headers=auth).json
    assert [r["step"] for r in first["items"]] == list(range(1, 1001))
    assert first["next_after_step"] == 1000
    assert set(first["items"][0]) == {"step", "loss", "lr", "grad_norm", "grad_norm_clipped", "clipped", "nonfinite",
                                      "skipped", "loss_scale", "tokens_per_s", "tokens_seen", "val_loss", "time"}
    page = client.get(f"{url}?after_step=4990&limit=20", headers=auth).json
    nan_row = next(r for r in page["items"] if r["step"] == NAN_STEP)
    assert nan_row["loss"] is None and nan_row["grad_norm"] is None and nan_row["nonfinite"] is True
    last = client.get(f"{url}?after_step=9500&limit=5000", headers=auth).json
    assert len(last["items"]) == 500 and last["next_after_step"] is None
    assert "limit" in client.get(f"{url}?limit=5001", headers=auth).json["error"]["details"]
    default = client.get(url, headers=auth).json
    assert len(default["items"]) == 1000
    started = time.perf_counter()
    for _ in range(10):
        assert client.get(f"{url}?after_step=50000&limit=1000", headers=auth).status_code == 200
        client.get(f"{url}?after_step=4000&limit=1000", headers=auth)
    assert (time.perf_counter() - started) / 20 < 0.5  # smoke check only; bench/ measures p99


def test_downsampling_keeps_spikes_and_nonfinite(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                  job: dict[str, Any]) -> None:
    _fill(app, job["id"])
    url = f"/v1/jobs/{job['id']}/metrics"
    body = client.get(f"{url}?limit=5000&after_step=2000&max_points=300", headers=auth).json
    steps = [r["step"] for r in body["items"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert len(steps) <= 300 + 2
    assert {SPIKE_LOSS_STEP, NAN_STEP, SKIP_STEP} <= set(steps)
    assert body["next_after_step"] == 7000
    tail = client.get(f"{url}?limit=5000&after_step=5000&max_points=100", headers=auth).json
    assert SPIKE_GRAD_STEP in [r["step"] for r in tail["items"]]
    spike = next(r for r in tail["items"] if r["step"] == SPIKE_GRAD_STEP)
    assert spike["grad_norm"] == 1e6
    small = client.get(f"{url}?limit=50&max_points=100", headers=auth).json
    assert len(small["items"]) == 50


def test_layer_metrics(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    layers = ["embed.weight", "layers.0.w", "head.weight"]
    with app.app_context():
        rows = [{"job_id": job["id"], "step": s, "layer": name, "grad_norm": 0.1 * i, "weight_norm": 1.0,
                 "update_ratio": 1e-3} for s in range(10, 101, 10) for i, name in enumerate(layers)]
        db.session.execute(insert(LayerMetric), rows)
        db.session.commit()
    url = f"/v1/jobs/{job['id']}/metrics/layers"
    page = client.get(f"{url}?limit=7", headers=auth).json
    assert [(r["step"], r["layer"]) for r in page["items"]] == [
        (s, name) for s in (10, 20) for name in sorted(layers)] + [(30, "embed.weight")]  # ends inside step 30
    rest = client.get(f"{url}?cursor={page['next_cursor']}&limit=1000", headers=auth).json
    assert [(r["step"], r["layer"]) for r in rest["items"][:2]] == [(30, "head.weight"), (30, "layers.0.w")]
    assert len(rest["items"]) == 23 and rest["next_cursor"] is None
    after = client.get(f"{url}?after_step=20&limit=1000", headers=auth).json  # after_step still starts a listing
    assert len(after["items"]) == 24 and after["items"][0]["step"] == 30
    one = client.get(f"{url}?layer=head.weight", headers=auth).json["items"]
    assert len(one) == 10 and {r["layer"] for r in one} == {"head.weight"}


DEPTH = (["tok_emb.weight", "pos_emb.weight"] + [f"blocks.{i}.{p}.weight" for i in range(12) for p in ("attn.qkv", "mlp.fc")]
         + ["head.weight"])


def test_layer_rows_come_in_depth_order_with_position(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                      job: dict[str, Any]) -> None:
    assert sorted(DEPTH) != DEPTH  # name order ("blocks.10" < "blocks.2", "head" < "pos_emb") is not depth order
    with app.app_context():
        rows = [{"job_id": job["id"], "step": s, "layer": name, "position": i, "grad_norm": 10.0 ** -i,
                 "weight_norm": 1.0, "update_ratio": 1e-3}
                for s in (30, 10, 20) for i, name in reversed(list(enumerate(DEPTH)))]
        db.session.execute(insert(LayerMetric), rows)
        db.session.commit()
    url = f"/v1/jobs/{job['id']}/metrics/layers"
    whole = client.get(f"{url}?limit=5000", headers=auth).json
    assert whole["next_cursor"] is None
    assert [(r["step"], r["position"], r["layer"]) for r in whole["items"]] == [
        (s, i, name) for s in (10, 20, 30) for i, name in enumerate(DEPTH)]
    assert set(whole["items"][0]) == {"step", "layer", "position", "grad_norm", "weight_norm", "update_ratio"}
    assert whole["items"][0]["grad_norm"] == 1.0 and whole["items"][-1]["layer"] == "head.weight"

    # pages of any size (ending inside steps) join up to the same depth-ordered list
    n = len(DEPTH)
    first = client.get(f"{url}?limit={n + 5}", headers=auth).json
    assert [r["layer"] for r in first["items"]] == DEPTH + DEPTH[:5]
    assert follow(client, auth, f"{url}?limit={n + 1}") == whole["items"]
    one = client.get(f"{url}?layer=blocks.10.mlp.fc.weight", headers=auth).json["items"]
    assert [(r["step"], r["position"]) for r in one] == [(s, DEPTH.index("blocks.10.mlp.fc.weight")) for s in (10, 20, 30)]


def test_layer_rows_without_position_come_in_name_order(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                        job: dict[str, Any]) -> None:
    """Rows recorded before positions existed: position null, name order within a step (clients fall back)."""
    with app.app_context():
        db.session.execute(insert(LayerMetric), [
            {"job_id": job["id"], "step": 5, "layer": name, "grad_norm": 1.0} for name in DEPTH])
        db.session.commit()
    items = client.get(f"/v1/jobs/{job['id']}/metrics/layers", headers=auth).json["items"]
    assert [r["layer"] for r in items] == sorted(DEPTH) and {r["position"] for r in items} == {None}


@pytest.mark.parametrize("start", [0, RowKey(10, 3, "blocks.1.mlp.fc.weight"), RowKey(10, None, "head.weight")])
@pytest.mark.parametrize("listing", ["layers", "activations"])
def test_depth_pages_read_their_index_without_sorting(app: Flask, job: dict[str, Any], start: Any,
                                                      listing: str) -> None:
    """The (job_id, step, position, name) index covers the page order, from after_step or from a cursor:
    no sort step in the plan."""
    query, index = {"layers": (metrics_service.layer_query, "ix_layer_metrics_job_step_position"),
                    "activations": (metrics_service.activation_query, "ix_activation_metrics_job_step_position")}[listing]
    if listing == "activations" and start != 0 and start.position is None:
        return  # activation rows always have a position
    with app.app_context():
        stmt = query(job["id"], start, 1001)
        conn = db.session.connection()
        sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
        if conn.dialect.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
            assert index in plan and "TEMP B-TREE" not in plan, plan
        else:
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = " ".join(r[0] for r in conn.execute(text(f"EXPLAIN {sql}")))
            assert index in plan and "Sort" not in plan, plan


def test_latest_from_metrics(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    with app.app_context():
        db.session.execute(insert(StepMetric), [_row(job["id"], s) for s in (1, 2)])
        db.session.commit()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json["latest"]["step"] == 2


def test_events_paging(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    with app.app_context():
        for i in range(5):
            db.session.add(Event(job_id=job["id"], step=i, kind="clip_burst", message=f"m{i}", data={"i": i}))
        db.session.commit()
    url = f"/v1/jobs/{job['id']}/events"
    first = client.get(f"{url}?limit=3", headers=auth).json
    assert [e["message"] for e in first["items"]] == ["m0", "m1", "m2"]
    rest = client.get(f"{url}?after_id={first['next_after_id']}", headers=auth).json
    assert [e["data"]["i"] for e in rest["items"]] == [3, 4] and rest["next_after_id"] is None


def test_diagnosis(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    url = f"/v1/jobs/{job['id']}/diagnosis"
    empty = client.get(url, headers=auth).json
    assert empty["findings"] == [] and empty["status"] == "queued" and empty["summary"]
    finding = {"kind": "exploding_gradients", "severity": "critical", "steps": {"first": 3, "last": 9},
               "layers": ["head.weight"], "evidence": {"max_grad_norm": 1e5},
               "recommendations": [{"field": "stabilization.clip.mode", "value": "norm", "why": "bound updates"}],
               "summary": "gradients exploded"}
    with app.app_context():
        row = db.session.get(Job, job["id"])
        row.diagnosis, row.health, row.status = [finding], "critical", "failed"
        db.session.commit()
    body = client.get(url, headers=auth).json
    assert body["findings"] == [finding] and body["health"] == "critical"
    assert "gradients exploded" in body["summary"]
