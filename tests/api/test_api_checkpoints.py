"""Checkpoint listing and downloads with ETag and Range."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.models import Checkpoint

PAYLOAD = os.urandom(4096)


def _write_checkpoint(app: Flask, job_id: str, step: int) -> str:
    path = Path(app.config["STORAGE_DIR"]) / "checkpoints" / job_id / f"step_{step}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PAYLOAD)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    with app.app_context():
        db.session.add(Checkpoint(job_id=job_id, step=step, bytes=len(PAYLOAD), sha256=sha, val_loss=2.5,
                                  health="ok"))
        db.session.commit()
    return sha


def test_list_and_download(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    sha = _write_checkpoint(app, job["id"], 100)
    items = client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json["items"]
    assert len(items) == 1
    item = items[0]
    assert item["step"] == 100 and item["sha256"] == sha and item["bytes"] == 4096 and item["val_loss"] == 2.5
    with client.get(item["download_url"], headers=auth) as response:
        assert response.status_code == 200 and response.data == PAYLOAD
        assert response.headers["ETag"] == f'"{sha}"'
        assert f"{job['id']}_step_100.pt" in response.headers["Content-Disposition"]
        assert response.headers["Content-Disposition"].startswith("attachment")
    with client.get(item["download_url"], headers={**auth, "If-None-Match": f'"{sha}"'}) as cached:
        assert cached.status_code == 304


def test_range_requests(app: Flask, client: FlaskClient, auth: dict[str, str], job: dict[str, Any]) -> None:
    _write_checkpoint(app, job["id"], 50)
    url = f"/v1/jobs/{job['id']}/checkpoints/50/file"
    with client.get(url, headers={**auth, "Range": "bytes=100-199"}) as partial:
        assert partial.status_code == 206 and partial.data == PAYLOAD[100:200]
        assert partial.headers["Content-Range"] == "bytes 100-199/4096"
    beyond = client.get(url, headers={**auth, "Range": "bytes=5000-6000"})
    assert beyond.status_code == 416
    assert beyond.json["error"]["code"] == "range_not_satisfiable"
    assert beyond.headers["Content-Range"] == "bytes */4096"


def test_unknown_step_and_missing_file(app: Flask, client: FlaskClient, auth: dict[str, str],
                                       job: dict[str, Any]) -> None:
    assert client.get(f"/v1/jobs/{job['id']}/checkpoints/7/file", headers=auth).status_code == 404
    with app.app_context():
        db.session.add(Checkpoint(job_id=job["id"], step=8, bytes=1, sha256="0" * 64))
        db.session.commit()
    pruned = client.get(f"/v1/jobs/{job['id']}/checkpoints/8/file", headers=auth)
    assert pruned.status_code == 404 and "no longer" in pruned.json["error"]["message"]
    assert client.get(f"/v1/jobs/{job['id']}/checkpoints/..%2F..%2Fetc/file", headers=auth).status_code == 404


def _assert_gone(response: Any, step: int) -> None:
    assert response.status_code == 404, (response.status_code, response.data[:200])
    error = response.json["error"]
    assert error["code"] == "not_found" and error["details"].get("step", step) == step, error


def test_pruned_between_listing_and_download(app: Flask, client: FlaskClient, auth: dict[str, str],
                                             job: dict[str, Any]) -> None:
    """keep_last removes the record and the file after the client listed it."""
    _write_checkpoint(app, job["id"], 10)
    item = client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json["items"][0]
    with app.app_context():
        db.session.delete(db.session.get(Checkpoint, (job["id"], 10)))
        db.session.commit()
    (Path(app.config["STORAGE_DIR"]) / "checkpoints" / job["id"] / "step_10.pt").unlink()
    _assert_gone(client.get(item["download_url"], headers=auth), 10)
    _assert_gone(client.get(item["download_url"], headers={**auth, "Range": "bytes=0-9"}), 10)


def test_file_deleted_or_missing_on_disk(app: Flask, client: FlaskClient, auth: dict[str, str],
                                         job: dict[str, Any]) -> None:
    _write_checkpoint(app, job["id"], 10)
    _write_checkpoint(app, job["id"], 20)
    folder = Path(app.config["STORAGE_DIR"]) / "checkpoints" / job["id"]
    (folder / "step_10.pt").unlink()  # deleted, its record kept
    _assert_gone(client.get(f"/v1/jobs/{job['id']}/checkpoints/10/file", headers=auth), 10)
    (folder / "step_20.pt").unlink()
    folder.rmdir()  # the job's whole folder missing
    _assert_gone(client.get(f"/v1/jobs/{job['id']}/checkpoints/20/file", headers=auth), 20)
    assert [c["step"] for c in client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json["items"]] == [10, 20]


def test_file_removed_while_the_download_starts(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                job: dict[str, Any], monkeypatch: Any) -> None:
    """The file is found, then pruned before it is opened: 404, not a 500 from the open."""
    from app.services import checkpoints as service

    _write_checkpoint(app, job["id"], 30)
    found = service.checkpoint_file

    def found_then_pruned(ckpt: Checkpoint) -> Any:
        key, info = found(ckpt)
        (Path(app.config["STORAGE_DIR"]) / key).unlink()
        return key, info

    monkeypatch.setattr(service, "checkpoint_file", found_then_pruned)
    _assert_gone(client.get(f"/v1/jobs/{job['id']}/checkpoints/30/file", headers=auth), 30)


def test_a_download_already_open_survives_a_prune(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                  job: dict[str, Any]) -> None:
    _write_checkpoint(app, job["id"], 40)
    with client.get(f"/v1/jobs/{job['id']}/checkpoints/40/file", headers=auth, buffered=False) as response:
        assert response.status_code == 200
        (Path(app.config["STORAGE_DIR"]) / "checkpoints" / job["id"] / "step_40.pt").unlink()
        assert b"".join(response.response) == PAYLOAD
