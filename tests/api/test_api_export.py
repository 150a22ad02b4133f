"""GET /v1/jobs/{id}/checkpoints/{step}/export: 409 for unmappable specs, 202 while a worker writes
the export, then the file (a Hugging Face .tar.gz or a weights-only .safetensors)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection

from app.extensions import db
from app.models import Checkpoint
from stabletrain_storage import LocalStorage, Storage, file_sha256
from tests.export_helpers import GPT2_SPEC, assert_hf_matches, extract_tar, write_checkpoint
from worker.exports import run_export


def storage_of(app: Flask) -> Storage:
    """The app's folder store, as a worker on the same host opens it."""
    return LocalStorage(Path(app.config["STORAGE_DIR"]))


@pytest.fixture
def gpt2_job(submit: Any, auth: dict[str, str], dataset: dict[str, Any]) -> dict[str, Any]:
    response = submit(auth, dataset["id"], model=GPT2_SPEC["model"],
                      training={"max_steps": 10, "seq_len": GPT2_SPEC["training"]["seq_len"]})
    assert response.status_code == 202, response.json
    return response.json


def _stored_checkpoint(app: Flask, job: dict[str, Any], step: int, raw_spec: dict[str, Any]) -> Any:
    """A real engine checkpoint file at the job's storage path, and its record."""
    path = Path(app.config["STORAGE_DIR"]) / "checkpoints" / job["id"] / f"step_{step}.pt"
    model = write_checkpoint(path, raw_spec)
    with app.app_context():
        db.session.add(Checkpoint(job_id=job["id"], step=step, bytes=path.stat().st_size,
                                  sha256=file_sha256(path)))
        db.session.commit()
    return model


def _export_messages(app: Flask) -> list[list[Any]]:
    """Export task arguments waiting on the samples queue (taken off it)."""
    out = []
    with Connection(app.config["BROKER_URL"]) as conn:
        queue = conn.SimpleQueue("samples")
        while queue.qsize():
            message = queue.get(timeout=1)
            if message.headers["task"] == "stabletrain.export":
                out.append(message.payload[0])
            message.ack()
        queue.close()
    return out


def _url(job: dict[str, Any], step: int, query: str = "") -> str:
    return f"/v1/jobs/{job['id']}/checkpoints/{step}/export?wait=0{query}"


def test_hf_export_is_requested_then_served(app: Flask, client: FlaskClient, auth: dict[str, str],
                                            gpt2_job: dict[str, Any], tmp_path: Path) -> None:
    model, tokenizer = _stored_checkpoint(app, gpt2_job, 10, GPT2_SPEC)
    first = client.get(_url(gpt2_job, 10), headers=auth)
    # exactly the service's own value: the rate limiter writes its window into X-RateLimit-Retry-After
    assert first.status_code == 202 and first.headers["Retry-After"] == "1"
    assert "X-RateLimit-Retry-After" in first.headers
    assert first.json == {"job_id": gpt2_job["id"], "step": 10, "format": "hf", "status": "pending",
                          "retry_after_s": 1}
    assert client.get(_url(gpt2_job, 10), headers=auth).status_code == 202
    messages = _export_messages(app)
    assert len(messages) == 1, "a pending export is asked for once"
    job_id, step, sha256, fmt = messages[0]
    assert (job_id, step, fmt) == (gpt2_job["id"], 10, "hf")
    assert run_export(storage_of(app), job_id, step, sha256, fmt) == "written"

    done = client.get(_url(gpt2_job, 10), headers=auth)
    assert done.status_code == 200 and done.mimetype == "application/gzip"
    assert f"{gpt2_job['id']}_step_10.hf.tar.gz" in done.headers["Content-Disposition"]
    data = done.data
    done.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = sorted(tar.getnames())
        extract_tar(tar, tmp_path / "hf")
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json"])
    assert_hf_matches(tmp_path / "hf", model, tokenizer, "Hi 你好", new_tokens=12)
    assert _export_messages(app) == [], "a stored export is served without asking a worker"


@pytest.mark.parametrize("over,field", [({"arch": "lstm", "activation": "tanh"}, "model.arch"),
                                        ({"qk_norm": True}, "model.qk_norm"),
                                        ({"norm": "rmsnorm"}, "model.norm")])
def test_unmappable_spec_answers_409_with_the_field(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                    submit: Any, dataset: dict[str, Any], over: dict[str, Any],
                                                    field: str) -> None:
    raw = {**GPT2_SPEC, "model": {**GPT2_SPEC["model"], **over}}
    job = submit(auth, dataset["id"], model=raw["model"], training={"max_steps": 10, "seq_len": 48}).json
    _stored_checkpoint(app, job, 10, raw)
    response = client.get(_url(job, 10), headers=auth)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "conflict" and field in response.json["error"]["details"]
    assert field in response.json["error"]["message"]
    assert _export_messages(app) == []
    # weights only: any architecture
    assert client.get(_url(job, 10, "&format=safetensors"), headers=auth).status_code == 202


def test_worker_failure_is_reported_once_then_retried(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                       gpt2_job: dict[str, Any]) -> None:
    path = Path(app.config["STORAGE_DIR"]) / "checkpoints" / gpt2_job["id"] / "step_10.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with app.app_context():
        db.session.add(Checkpoint(job_id=gpt2_job["id"], step=10, bytes=16, sha256=file_sha256(path)))
        db.session.commit()
    assert client.get(_url(gpt2_job, 10), headers=auth).status_code == 202
    [args] = _export_messages(app)
    assert run_export(storage_of(app), *args) == "failed"
    failed = client.get(_url(gpt2_job, 10), headers=auth)
    assert failed.status_code == 500 and failed.json["error"]["code"] == "export_failed"
    assert "cannot read checkpoint" in failed.json["error"]["message"]
    assert _export_messages(app) == []
    # reported once: the next request asks a worker again
    assert client.get(_url(gpt2_job, 10), headers=auth).status_code == 202
    assert len(_export_messages(app)) == 1


def test_bad_format_and_missing_checkpoint(app: Flask, client: FlaskClient, auth: dict[str, str],
                                           gpt2_job: dict[str, Any]) -> None:
    _stored_checkpoint(app, gpt2_job, 10, GPT2_SPEC)
    bad = client.get(_url(gpt2_job, 10, "&format=onnx"), headers=auth)
    assert bad.status_code == 422 and "format" in bad.json["error"]["details"]
    assert client.get(_url(gpt2_job, 11), headers=auth).status_code == 404
    (Path(app.config["STORAGE_DIR"]) / "checkpoints" / gpt2_job["id"] / "step_10.pt").unlink()
    assert client.get(_url(gpt2_job, 10), headers=auth).status_code == 404
    assert _export_messages(app) == []


def test_weights_only_export_of_any_arch(app: Flask, client: FlaskClient, auth: dict[str, str], submit: Any,
                                         dataset: dict[str, Any], tmp_path: Path) -> None:
    raw = {**GPT2_SPEC, "model": {"arch": "lstm", "n_layers": 1, "d_model": 16, "hidden": 16}}
    job = submit(auth, dataset["id"], model=raw["model"], training={"max_steps": 10, "seq_len": 48}).json
    model, _ = _stored_checkpoint(app, job, 10, raw)
    assert client.get(_url(job, 10, "&format=safetensors"), headers=auth).status_code == 202
    [args] = _export_messages(app)
    assert args[3] == "safetensors"
    assert run_export(storage_of(app), *args) == "written"
    response = client.get(_url(job, 10, "&format=safetensors"), headers=auth)
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    (tmp_path / "w.safetensors").write_bytes(response.data)
    response.close()
    from stabletrain_export.weights import read_engine_state

    state = read_engine_state(tmp_path / "w.safetensors")
    assert state["spec"]["model"]["arch"] == "lstm" and set(state["model"]) == set(model.state_dict())


@pytest.mark.app_config(MAX_PARAMS=300_000)
def test_bpe_vocabulary_counts_toward_the_parameter_limit(client: FlaskClient, auth: dict[str, str],
                                                           submit: Any, dataset: dict[str, Any]) -> None:
    model = {**GPT2_SPEC["model"], "n_layers": 1, "d_model": 64}
    assert submit(auth, dataset["id"], model=model, tokenizer={"kind": "bpe", "vocab_size": 512}).status_code == 202
    refused = submit(auth, dataset["id"], model=model, tokenizer={"kind": "bpe", "vocab_size": 4096})
    assert refused.status_code == 422 and "model" in refused.json["error"]["details"]
    bad = submit(auth, dataset["id"], model=model, tokenizer={"kind": "bpe", "vocab_size": 70000})
    assert bad.status_code == 422 and "tokenizer.vocab_size" in bad.json["error"]["details"]
