"""The API and the workers share nothing but the database and the bucket.

Each "host" has its own, initially empty, local folder (STORAGE_DIR, with its cache): the API host takes
the upload and serves downloads, worker host A trains, host B samples and resumes, host C exports. The
bucket is moto's S3 server (tests/storage/conftest.py); the database is SQLite or PostgreSQL.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, update

from app import create_app
from app.extensions import db
from app.models import Checkpoint, DatasetFile, Event, Job, StepMetric
from tests.conftest import create_key, release_app
from tests.worker.jobfactory import TINY_SPEC
from worker.exports import run_export
from worker.service import find_resume_point, run_sample, run_train_job
from worker.settings import WorkerSettings, load_settings
from worker.testing import wait_for

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))
PREFIX = "stabletrain"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _app(request: pytest.FixtureRequest, backend: str, folder: Path, url: str, endpoint: str) -> Flask:
    config: dict[str, Any] = {
        "TESTING": True, "DATABASE_URL": f"sqlite:///{folder.parent / 'test.db'}",
        "BROKER_URL": f"sqlalchemy+sqlite:///{folder.parent / 'broker.db'}", "STORAGE_DIR": str(folder),
        "STORAGE_URL": url, "S3_ENDPOINT_URL": endpoint, "RATELIMIT_ENABLED": False, "SAMPLE_POLL_S": 0.05,
    }
    if backend == "postgres":
        config["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    app = create_app(config)
    with app.app_context():
        db.create_all()
    return app


@pytest.fixture
def api(request: pytest.FixtureRequest, backend: str, tmp_path: Path, bucket_url: str,
        moto_endpoint: str) -> Iterator[Flask]:
    """The API host: its own folder, the shared bucket and database."""
    app = _app(request, backend, tmp_path / "api-host", bucket_url, moto_endpoint)
    yield app
    release_app(app, backend)


@pytest.fixture
def engine(api: Flask) -> Engine:
    with api.app_context():
        return db.engine


@pytest.fixture
def auth(api: Flask) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_key(api.test_cli_runner())[1]}"}


def host(api: Flask, folder: Path, **changes: Any) -> WorkerSettings:
    """A worker host's settings: the API's database and bucket, its own empty local folder."""
    base = load_settings(api.config)
    return replace(base, storage_dir=folder, cache_dir=None, lease_s=30.0, heartbeat_s=0.05, device="cpu",
                   db_retry_s=10.0, worker_id=folder.name, **changes)


def bucket_keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/{prefix}")
    return sorted(item["Key"].removeprefix(f"{PREFIX}/") for item in listing.get("Contents", []))


def object_bytes(s3_client: Any, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")["Body"].read()


def upload(client: FlaskClient, auth: dict[str, str], text: str = CORPUS) -> dict[str, Any]:
    response = client.post("/v1/datasets?name=corpus", data=text.encode(), headers={**auth, "Content-Type": "text/plain"})
    assert response.status_code == 201, response.json
    return response.json


def submit(client: FlaskClient, auth: dict[str, str], dataset_id: str) -> str:
    body = {key: TINY_SPEC[key] for key in ("model", "training", "monitoring", "checkpointing")}
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "name": "tiny", **body}, headers=auth)
    assert response.status_code == 202, response.json
    return response.json["id"]


def records(engine: Engine, job_id: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()


def test_train_download_sample_export_and_resume_across_hosts(
        api: Flask, engine: Engine, auth: dict[str, str], tmp_path: Path, bucket: str, s3_client: Any) -> None:
    client = api.test_client()
    dataset = upload(client, auth)
    sha = hashlib.sha256(CORPUS.encode()).hexdigest()
    assert bucket_keys(s3_client, bucket, "datasets/") == [f"datasets/{sha}.txt"]
    assert object_bytes(s3_client, bucket, f"datasets/{sha}.txt") == CORPUS.encode()
    assert not (tmp_path / "api-host" / "datasets" / f"{sha}.txt").exists()  # the bucket holds it, not the host

    # host A trains: its checkpoints reach the bucket, and each record names an uploaded object
    job_id = submit(client, auth, dataset["id"])
    assert run_train_job(engine, job_id, host(api, tmp_path / "host-a")) == "succeeded"
    assert list((tmp_path / "host-a" / "cache" / "checkpoints" / job_id).iterdir()) == []  # uploaded, then freed
    stored = records(engine, job_id)
    assert [c.step for c in stored] == [10, 12]  # keep_last 2: step 5 left the bucket with its record
    assert bucket_keys(s3_client, bucket, f"checkpoints/{job_id}/") == [
        f"checkpoints/{job_id}/step_10.pt", f"checkpoints/{job_id}/step_12.pt"]
    for c in stored:
        body = object_bytes(s3_client, bucket, f"checkpoints/{job_id}/step_{c.step}.pt")
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (c.sha256, c.bytes)

    # the API streams it from the bucket: whole (ETag = sha256), a range, and not-modified
    newest = stored[-1]
    url = f"/v1/jobs/{job_id}/checkpoints/12/file"
    whole = client.get(url, headers=auth)
    assert whole.status_code == 200 and hashlib.sha256(whole.data).hexdigest() == newest.sha256
    assert whole.headers["ETag"] == f'"{newest.sha256}"' and whole.headers["Accept-Ranges"] == "bytes"
    part = client.get(url, headers={**auth, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.data == whole.data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{newest.bytes}"
    tail = client.get(url, headers={**auth, "Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.data == whole.data[-16:]
    assert client.get(url, headers={**auth, "If-None-Match": f'"{newest.sha256}"'}).status_code == 304
    assert client.get(url, headers={**auth, "Range": f"bytes={newest.bytes + 5}-"}).status_code == 416

    # host B samples with an empty cache: the checkpoint comes from the bucket
    host_b = host(api, tmp_path / "host-b")
    response = client.post(f"/v1/jobs/{job_id}/samples", json={"prompt": "line 1", "max_new_tokens": 8}, headers=auth)
    assert response.status_code == 202, response.json
    assert run_sample(engine, response.json["id"], host_b) == "succeeded"
    sample = client.get(f"/v1/jobs/{job_id}/samples/{response.json['id']}", headers=auth).json
    assert sample["status"] == "succeeded" and sample["text"]
    cached = tmp_path / "host-b" / "cache" / "checkpoints" / job_id / "step_12.pt"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == newest.sha256

    # host C exports with an empty cache; the API serves the export from the bucket
    export_url = f"/v1/jobs/{job_id}/checkpoints/12/export?format=safetensors&wait=0"
    assert client.get(export_url, headers=auth).status_code == 202
    export_key = f"exports/{job_id}/step_12-{newest.sha256[:16]}.safetensors"
    assert bucket_keys(s3_client, bucket, "exports/") == [export_key + ".pending"]
    assert run_export(host(api, tmp_path / "host-c").storage, job_id, 12, newest.sha256, "safetensors") == "written"
    exported = client.get(export_url, headers=auth)
    assert exported.status_code == 200 and exported.data == object_bytes(s3_client, bucket, export_key)
    assert bucket_keys(s3_client, bucket, "exports/") == [export_key]

    # the job comes back for 8 more steps; its newest object was damaged in the bucket meanwhile:
    # host D (empty cache) skips it for the next older one, which it finds intact
    s3_client.put_object(Bucket=bucket, Key=f"{PREFIX}/checkpoints/{job_id}/step_12.pt", Body=b"damaged")
    spec = {**TINY_SPEC, "training": {**TINY_SPEC["training"], "max_steps": 20}}
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status="queued", spec=spec, max_steps=20,
                                                                finished_at=None))
    host_d = host(api, tmp_path / "host-d")
    path, step = find_resume_point(engine, job_id, host_d.storage)
    assert step == 10 and path == tmp_path / "host-d" / "cache" / "checkpoints" / job_id / "step_10.pt"
    assert run_train_job(engine, job_id, host_d) == "succeeded"
    with engine.connect() as conn:
        resumed = conn.execute(select(Event.step).where(Event.job_id == job_id, Event.kind == "resumed")).scalars().all()
        trained = conn.execute(select(StepMetric.step).where(StepMetric.job_id == job_id)
                               .order_by(StepMetric.step)).scalars().all()
    assert resumed == [10] and trained == list(range(1, 21))
    final = records(engine, job_id)
    assert [c.step for c in final] == [15, 20]
    assert bucket_keys(s3_client, bucket, f"checkpoints/{job_id}/") == [
        f"checkpoints/{job_id}/step_15.pt", f"checkpoints/{job_id}/step_20.pt"]
    for c in final:
        body = object_bytes(s3_client, bucket, f"checkpoints/{job_id}/step_{c.step}.pt")
        assert hashlib.sha256(body).hexdigest() == c.sha256


def test_a_dataset_object_goes_with_its_last_reference(api: Flask, engine: Engine, auth: dict[str, str],
                                                        bucket: str, s3_client: Any) -> None:
    client = api.test_client()
    other = {"Authorization": f"Bearer {create_key(api.test_cli_runner(), 'other')[1]}"}
    first, second = upload(client, auth), upload(client, other)  # the same content from two keys
    key = f"datasets/{first['sha256']}.txt"
    assert client.delete(f"/v1/datasets/{first['id']}", headers=auth).status_code == 204
    assert bucket_keys(s3_client, bucket, "datasets/") == [key]  # still referenced by the other key
    assert client.delete(f"/v1/datasets/{second['id']}", headers=other).status_code == 204
    assert bucket_keys(s3_client, bucket, "datasets/") == [] and bucket_keys(s3_client, bucket, "tmp/") == []
    with engine.connect() as conn:
        assert conn.execute(select(DatasetFile.refs).where(DatasetFile.sha256 == first["sha256"])).scalar_one() == 0


def test_a_failed_dataset_upload_leaves_no_record(request: pytest.FixtureRequest, backend: str, tmp_path: Path,
                                                  moto_endpoint: str) -> None:
    """The bucket is missing: 503, and neither a dataset nor a file reference was recorded."""
    app = _app(request, backend, tmp_path / "api-host", "s3://no-such-bucket/x", moto_endpoint)
    try:
        client = app.test_client()
        headers = {"Authorization": f"Bearer {create_key(app.test_cli_runner())[1]}"}
        response = client.post("/v1/datasets", data=CORPUS.encode(), headers={**headers, "Content-Type": "text/plain"})
        assert response.status_code == 503 and response.json["error"]["code"] == "storage_unavailable"
        assert client.get("/v1/datasets", headers=headers).json["items"] == []
        with app.app_context():
            assert db.session.execute(select(DatasetFile)).all() == []
    finally:
        release_app(app, backend)


def delete_bucket(s3_client: Any, bucket: str) -> set[str]:
    """Empty and delete the bucket under a running worker; returns the keys that were in it."""
    deleted: set[str] = set()

    def attempt() -> bool:
        for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3_client.delete_object(Bucket=bucket, Key=item["Key"])
            deleted.add(item["Key"].removeprefix(f"{PREFIX}/"))
        try:
            s3_client.delete_bucket(Bucket=bucket)
        except ClientError:  # an upload landed since the listing: empty it again
            return False
        return True

    wait_for(attempt, 30, "the bucket to be deleted")
    return deleted


def test_a_failed_checkpoint_upload_leaves_no_record(api: Flask, engine: Engine, auth: dict[str, str],
                                                     tmp_path: Path, bucket: str, s3_client: Any) -> None:
    """The bucket goes away during training: training goes on, the checkpoints whose upload failed get no
    record (only uploaded ones have one), and the job's final state is written after the last upload."""
    client = api.test_client()
    dataset = upload(client, auth)
    body = {**{key: TINY_SPEC[key] for key in ("model", "monitoring")},
            "training": {**TINY_SPEC["training"], "max_steps": 1_000_000},
            "checkpointing": {"every_steps": 5, "keep_last": 100}}
    response = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "name": "long", **body}, headers=auth)
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(run_train_job(engine, job_id, host(api, tmp_path / "a"))))
    worker.start()
    try:
        wait_for(lambda: records(engine, job_id), 120, "the first uploaded checkpoint")
        uploaded = delete_bucket(s3_client, bucket)
        wait_for(lambda: failed_steps(engine, job_id), 120, "an upload to fail")
    finally:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        worker.join(timeout=120)
    assert outcome == ["cancelled"]
    recorded = {f"checkpoints/{job_id}/step_{c.step}.pt" for c in records(engine, job_id)}
    assert recorded and recorded <= uploaded  # every record names an object that was uploaded
    with engine.connect() as conn:
        final_step = conn.execute(select(Job.step).where(Job.id == job_id)).scalar_one()
    failed = failed_steps(engine, job_id)
    assert final_step in failed  # the cancel's checkpoint: its upload ended before the final state
    assert not {f"checkpoints/{job_id}/step_{s}.pt" for s in failed} & recorded
    assert max(failed) > max(int(k.rsplit("_", 1)[1].split(".")[0]) for k in recorded)  # training went on
    assert list((tmp_path / "a" / "cache" / "checkpoints" / job_id).iterdir()) == []  # no staged copy left behind


def failed_steps(engine: Engine, job_id: str) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(Event.step).where(Event.job_id == job_id, Event.kind == "checkpoint_failed",
                                                         Event.message.contains("upload failed"))).scalars())
