"""Dataset files are shared by content hash and reference-counted under a lock: a delete never removes a
file that another record (any key's dataset row, and so its jobs) uses, even racing an upload of the
same content by another key. Runs on SQLite and PostgreSQL (the `app` fixture's backends)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app.extensions import db
from app.models import Dataset, DatasetFile
from stabletrain_storage import LocalStorage
from worker.service import load_inputs

ROUNDS = 16


def _file(app: Flask, text: str) -> Path:
    return Path(app.config["STORAGE_DIR"]) / "datasets" / f"{hashlib.sha256(text.encode()).hexdigest()}.txt"


def _refs(app: Flask, text: str) -> tuple[int | None, int]:
    """(counted references, dataset rows) of a content."""
    sha = hashlib.sha256(text.encode()).hexdigest()
    with app.app_context():
        refs = db.session.execute(select(DatasetFile.refs).where(DatasetFile.sha256 == sha)).scalar_one_or_none()
        rows = db.session.execute(select(func.count()).select_from(Dataset).where(Dataset.sha256 == sha)).scalar_one()
        db.session.remove()
    return refs, rows


def _job_reads(app: Flask, submit: Any, headers: dict[str, str], dataset_id: str, text: str) -> str:
    """Submit a job on the dataset and load its inputs as the worker does; returns the job id."""
    response = submit(headers, dataset_id)
    assert response.status_code == 202, response.json
    with app.app_context():
        _spec, loaded, _started = load_inputs(db.engine, response.json["id"], LocalStorage(Path(app.config["STORAGE_DIR"])))
    assert loaded.path.read_text(encoding="utf-8") == text and loaded.sha256 == hashlib.sha256(text.encode()).hexdigest()
    return response.json["id"]


def _race(app: Flask, *requests: Callable[[FlaskClient], Any]) -> list[Any]:
    """Run the requests at the same moment, each on its own thread and client; their responses in order."""
    results: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = requests[i](app.test_client())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_shared_file_outlives_one_owners_delete(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                make_auth: Any, upload: Any, submit: Any) -> None:
    text = "shared corpus line. " * 200
    other = make_auth("other")
    mine, theirs = upload(auth, text).json, upload(other, text).json
    assert _refs(app, text) == (2, 2)
    assert client.delete(f"/v1/datasets/{mine['id']}", headers=auth).status_code == 204
    assert _file(app, text).is_file() and _refs(app, text) == (1, 1)
    job_id = _job_reads(app, submit, other, theirs["id"], text)
    assert client.delete(f"/v1/datasets/{theirs['id']}", headers=other).status_code == 409  # a live job uses it
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=other).status_code == 200
    assert client.delete(f"/v1/datasets/{theirs['id']}", headers=other).status_code == 204
    assert not _file(app, text).exists() and _refs(app, text) == (0, 0), "the last reference removes the file"
    again = upload(auth, text)  # the content can come back
    assert again.status_code == 201 and _file(app, text).is_file() and _refs(app, text) == (1, 1)
    assert not list((Path(app.config["STORAGE_DIR"]) / "tmp").iterdir()), "no temp file left behind"


def test_a_wrong_count_never_removes_a_used_file(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                 make_auth: Any, upload: Any) -> None:
    """Rows written without a count (before migration 0006, or by hand): the rows decide."""
    text = "uncounted corpus. " * 200
    other = make_auth("other")
    mine, _theirs = upload(auth, text).json, upload(other, text).json
    with app.app_context():
        db.session.execute(db.delete(DatasetFile))
        db.session.commit()
    assert client.delete(f"/v1/datasets/{mine['id']}", headers=auth).status_code == 204
    assert _file(app, text).is_file() and _refs(app, text) == (1, 1)


def test_delete_racing_an_upload_of_the_same_content(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                     make_auth: Any, upload: Any, submit: Any) -> None:
    """Key A deletes its dataset while key B uploads the same content, ROUNDS times: afterwards B's dataset
    file exists and a job on it reads it. (Before the counts, A's delete could unlink the file between
    B finding it in place and B's commit.)"""
    other = make_auth("other")
    for i in range(ROUNDS):
        text = f"round {i % 2}: racing corpus line. " * 200
        mine = upload(auth, text).json
        delete_url = f"/v1/datasets/{mine['id']}"
        results = _race(app, lambda c, url=delete_url: c.delete(url, headers=auth),
                        lambda c, body=text: c.post("/v1/datasets?name=theirs", data=body,
                                                    headers={**other, "Content-Type": "text/plain"}))
        assert [r.status_code for r in results] == [204, 201], [r.json for r in results]
        theirs = results[1].json
        assert _file(app, text).is_file(), f"round {i}: B's dataset file was removed"
        assert _refs(app, text) == (1, 1), f"round {i}"
        job_id = _job_reads(app, submit, other, theirs["id"], text)
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=other).status_code == 200
        assert client.delete(f"/v1/datasets/{theirs['id']}", headers=other).status_code == 204
        assert not _file(app, text).exists()
