"""The loop closed on a real net: a deep sigmoid MLP is diagnosed `vanishing`; its retry with
{"apply": "recommendations"} is not, and ends at a lower loss.

Jobs go through the API (test client) and train in this process through the worker's own entry point
(worker.service.run_train_job: claim, reporter, engine, result) on the API's database; the queue
message the API publishes is simply left on the test's broker. About 10 s per backend on two cores.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from worker.service import run_train_job
from worker.settings import load_settings

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
# Eight sigmoid layers, small normal init, no norm, no residual: gradients die on the way down.
DEEP_SIGMOID_MLP: dict[str, Any] = {
    "name": "deep-sigmoid",
    "model": {"arch": "mlp", "n_layers": 8, "d_model": 16, "hidden": 64, "context": 8,
              "activation": "sigmoid", "init": "normal", "init_std": 0.05, "norm": "none", "residual": False},
    "training": {"max_steps": 150, "batch_size": 16, "seq_len": 32, "lr": 3e-3, "optimizer": "adam",
                 "eval_every": 50},
    "stabilization": {"clip": {"mode": "none"}},
    "monitoring": {"layer_stats_every": 10},
    "checkpointing": {"every_steps": 150, "keep_last": 1},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores
    yield
    torch.set_num_threads(before)


def train(app: Flask, job_id: str) -> str:
    """Run the job to its end in this process, as a worker would."""
    settings = replace(load_settings(app.config), worker_id="retry-loop", device="cpu")
    with app.app_context():
        engine = db.engine
    return run_train_job(engine, job_id, settings)


def final_loss(client: FlaskClient, auth: dict[str, str], job_id: str) -> float:
    """Mean training loss of the last 10 steps (one step's loss is one batch's noise)."""
    rows = client.get(f"/v1/jobs/{job_id}/metrics?limit=1000", headers=auth).json["items"]
    return statistics.mean(r["loss"] for r in rows[-10:])


def kinds(client: FlaskClient, auth: dict[str, str], job_id: str) -> list[str]:
    return [f["kind"] for f in client.get(f"/v1/jobs/{job_id}/diagnosis", headers=auth).json["findings"]]


def test_retry_with_recommendations_cures_vanishing_gradients(app: Flask, client: FlaskClient,
                                                              auth: dict[str, str]) -> None:
    text = CORPUS.read_text(encoding="utf-8")[:40_000]
    dataset = client.post("/v1/datasets?name=corpus", data=text.encode(),
                          headers={**auth, "Content-Type": "text/plain"}).json
    parent = client.post("/v1/jobs", json={**DEEP_SIGMOID_MLP, "dataset_id": dataset["id"]}, headers=auth).json
    assert train(app, parent["id"]) == "succeeded"
    assert "vanishing" in kinds(client, auth, parent["id"])

    response = client.post(f"/v1/jobs/{parent['id']}/retry", json={"apply": "recommendations"}, headers=auth)
    assert response.status_code == 202, response.json
    child = response.json
    applied = {c["field"]: c["value"] for c in child["applied_patch"] if c["from_finding"] == "vanishing"}
    assert applied["model.activation"] == "relu" and child["spec"]["model"]["activation"] == "relu"
    assert train(app, child["id"]) == "succeeded"

    assert "vanishing" not in kinds(client, auth, child["id"])
    parent_loss, child_loss = final_loss(client, auth, parent["id"]), final_loss(client, auth, child["id"])
    assert child_loss < parent_loss - 0.5, (parent_loss, child_loss)
    assert client.get(f"/v1/jobs/{parent['id']}", headers=auth).json["children"] == [child["id"]]
