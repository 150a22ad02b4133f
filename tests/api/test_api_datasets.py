"""Dataset upload, listing, reading and deletion."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.models import Job


def _file(app: Flask, sha: str) -> Path:
    return Path(app.config["STORAGE_DIR"]) / "datasets" / f"{sha}.txt"


def test_upload_text_plain(app: Flask, upload: Any, auth: dict[str, str]) -> None:
    text = "héllo wörld\n" * 100
    response = upload(auth, text.encode("utf-8"), name="poems")
    assert response.status_code == 201
    body = response.json
    assert body["id"].startswith("ds_") and len(body["id"]) == 27
    assert body["name"] == "poems"
    assert body["bytes"] == len(text.encode())
    assert body["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert body["created_at"].endswith("+00:00")
    assert _file(app, body["sha256"]).read_bytes() == text.encode()
    assert not list((Path(app.config["STORAGE_DIR"]) / "tmp").iterdir())


def test_upload_multipart(client: FlaskClient, auth: dict[str, str]) -> None:
    data = {"file": (io.BytesIO(b"abc " * 50), "shakespeare.txt"), "name": "bard"}
    response = client.post("/v1/datasets", data=data, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 201, response.json
    assert response.json["name"] == "bard" and response.json["bytes"] == 200
    missing = client.post("/v1/datasets", data={"name": "x"}, headers=auth, content_type="multipart/form-data")
    assert missing.status_code == 422 and "file" in missing.json["error"]["details"]


@pytest.mark.app_config(MAX_DATASET_BYTES=1000)
def test_upload_too_large_is_413(client: FlaskClient, upload: Any, auth: dict[str, str]) -> None:
    response = upload(auth, b"a" * 1001)
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    data = {"file": (io.BytesIO(b"a" * 1500), "big.txt")}
    response = client.post("/v1/datasets", data=data, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 413
    huge = client.post("/v1/datasets", data=b"a" * 200_000, headers={**auth, "Content-Type": "text/plain"})
    assert huge.status_code == 413 and "error" in huge.json


@pytest.mark.app_config(MAX_DATASET_BYTES_PER_KEY=3000)
def test_per_key_quota(upload: Any, auth: dict[str, str], make_auth: Any) -> None:
    assert upload(auth, b"a" * 2000).status_code == 201
    response = upload(auth, b"b" * 2000)
    assert response.status_code == 413 and "quota" in response.json["error"]["message"]
    assert upload(make_auth("other"), b"b" * 2000).status_code == 201


def test_bad_uploads_are_422_or_415(client: FlaskClient, upload: Any, auth: dict[str, str]) -> None:
    not_utf8 = upload(auth, b"ok \xff\xfe bad")
    assert not_utf8.status_code == 422 and "UTF-8" in not_utf8.json["error"]["message"]
    empty = upload(auth, b"")
    assert empty.status_code == 422 and "empty" in empty.json["error"]["message"]
    wrong = client.post("/v1/datasets", json={"text": "x"}, headers=auth)
    assert wrong.status_code == 415


def test_list_paging_read(client: FlaskClient, upload: Any, auth: dict[str, str]) -> None:
    made = [upload(auth, f"text number {i}", name=f"d{i}").json["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/datasets?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=auth).json
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(made))
    one = client.get(f"/v1/datasets/{made[0]}", headers=auth)
    assert one.status_code == 200 and one.json["name"] == "d0"
    assert client.get("/v1/datasets/ds_missing", headers=auth).status_code == 404
    bad = client.get("/v1/datasets?cursor=@@@", headers=auth)
    assert bad.status_code == 422
    assert client.get("/v1/datasets?limit=0", headers=auth).json["error"]["details"]["limit"]


def test_delete_shared_file_and_conflict(app: Flask, client: FlaskClient, upload: Any, auth: dict[str, str],
                                         make_auth: Any, submit: Any) -> None:
    first = upload(auth, "same content " * 100).json
    second = upload(make_auth("other"), "same content " * 100).json
    assert first["sha256"] == second["sha256"] and first["id"] != second["id"]
    job = submit(auth, first["id"], training={"seq_len": 8, "max_steps": 5})
    assert job.status_code == 202, job.json
    conflict = client.delete(f"/v1/datasets/{first['id']}", headers=auth)
    assert conflict.status_code == 409 and conflict.json["error"]["details"]["job_id"] == job.json["id"]
    with app.app_context():
        db.session.get(Job, job.json["id"]).status = "succeeded"
        db.session.commit()
    assert client.delete(f"/v1/datasets/{first['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/datasets/{first['id']}", headers=auth).status_code == 404
    assert _file(app, first["sha256"]).exists(), "still used by the other key's dataset"
    assert client.get(f"/v1/jobs/{job.json['id']}", headers=auth).json["dataset_id"] is None
