"""Uploads stream to storage in chunks: the size limit, the UTF-8 check and the hash work chunk by chunk,
a refused upload leaves nothing behind, and the API's memory does not grow with the upload."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.datastructures import FileStorage
from werkzeug.test import stream_encode_multipart

from app.extensions import db
from app.models import Dataset, DatasetFile
from app.services import datasets as datasets_service

CHUNK = 8  # small chunks, so a character or the limit can fall on a chunk edge in a short body


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_service, "CHUNK", CHUNK)


def _post(client: FlaskClient, auth: dict[str, str], body: bytes, how: str) -> Any:
    if how == "text":
        return client.post("/v1/datasets?name=d", data=body, headers={**auth, "Content-Type": "text/plain"})
    return client.post("/v1/datasets", data={"file": (io.BytesIO(body), "d.txt")}, headers=auth,
                       content_type="multipart/form-data")


def _stored(app: Flask) -> dict[str, Any]:
    """Everything an upload could leave: temp files, dataset files, rows and reference counts."""
    storage = Path(app.config["STORAGE_DIR"])
    with app.app_context():
        rows = db.session.execute(select(func.count()).select_from(Dataset)).scalar_one()
        refs = dict(db.session.execute(select(DatasetFile.sha256, DatasetFile.refs)).all())
        db.session.remove()
    return {"tmp": sorted(p.name for p in (storage / "tmp").iterdir()),
            "files": sorted(p.name for p in (storage / "datasets").iterdir()), "rows": rows, "refs": refs}


@pytest.mark.parametrize("how", ["text", "multipart"])
@pytest.mark.app_config(MAX_DATASET_BYTES=100)
def test_over_the_limit_is_413_and_leaves_nothing(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                  small_chunks: None, how: str) -> None:
    kept = _post(client, auth, b"x" * 100, how)  # exactly the limit is fine
    assert kept.status_code == 201, kept.json
    before = _stored(app)
    assert before["rows"] == 1 and before["refs"] == {kept.json["sha256"]: 1} and before["tmp"] == []
    # under MAX_CONTENT_LENGTH (limit + framing room), so the service's streamed count refuses it mid-stream
    response = _post(client, auth, b"y" * 101, how)
    assert response.status_code == 413, response.json
    assert response.json["error"]["code"] == "payload_too_large"
    assert response.json["error"]["details"] == {"max_bytes": 100}
    assert _stored(app) == before


@pytest.mark.parametrize("how", ["text", "multipart"])
def test_invalid_utf8_split_across_chunks_is_422_and_leaves_nothing(app: Flask, client: FlaskClient,
                                                                    auth: dict[str, str], small_chunks: None,
                                                                    how: str) -> None:
    before = _stored(app)
    # byte 7 starts a 3-byte character, the next chunk goes on with a valid continuation byte and then
    # "x": only the two chunks together show the sequence is broken
    body = b"abcdefg\xe6" + b"\x97xyz" * 4
    response = _post(client, auth, body, how)
    assert response.status_code == 422, response.json
    assert "UTF-8" in response.json["error"]["message"]
    assert "byte 7" in response.json["error"]["details"]["file"][0]
    truncated = _post(client, auth, b"abcdefgh" * 2 + "漢".encode()[:2], how)  # cut at the very end
    assert truncated.status_code == 422 and "byte 16" in truncated.json["error"]["details"]["file"][0]
    assert _stored(app) == before


@pytest.mark.parametrize("how", ["text", "multipart"])
def test_multibyte_characters_split_across_chunks_are_accepted(app: Flask, client: FlaskClient,
                                                               auth: dict[str, str], small_chunks: None,
                                                               how: str) -> None:
    text = "abcdef漢字🙂é" * 5  # 3- and 4-byte characters fall on every chunk edge in turn
    body = text.encode("utf-8")
    assert any(0x80 <= body[i] < 0xC0 for i in range(CHUNK, len(body), CHUNK)), "a chunk edge inside a character"
    response = _post(client, auth, body, how)
    assert response.status_code == 201, response.json
    assert response.json["bytes"] == len(body) and response.json["sha256"] == hashlib.sha256(body).hexdigest()
    stored = Path(app.config["STORAGE_DIR"]) / "datasets" / f"{response.json['sha256']}.txt"
    assert stored.read_bytes() == body and _stored(app)["tmp"] == []


@pytest.mark.parametrize("how", ["text", "multipart"])
def test_upload_memory_does_not_grow_with_its_size(app: Flask, client: FlaskClient, auth: dict[str, str],
                                                   tmp_path: Path, how: str) -> None:
    size = 24 * 1024 * 1024
    corpus = tmp_path / "big.txt"
    with open(corpus, "wb") as fh:
        for _ in range(size // (1 << 20)):
            fh.write(("line of text ü\n" * 65536).encode()[: 1 << 20])
    with open(corpus, "rb") as fh:
        if how == "text":
            body, length, content_type = fh, size, "text/plain"
        else:  # encoded (into a temp file) before measuring: only the server's side is counted
            body, length, boundary = stream_encode_multipart({"file": FileStorage(fh, "big.txt")})
            content_type = f"multipart/form-data; boundary={boundary}"
        tracemalloc.start()
        try:
            response = client.post("/v1/datasets", input_stream=body, content_length=length,
                                   content_type=content_type, headers=auth)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            body.close()
    assert response.status_code == 201, response.json
    assert response.json["bytes"] == size
    assert peak < 8 * 1024 * 1024, f"peak Python memory {peak} bytes for a {size} byte upload"


def test_token_cache_goes_with_the_last_reference(app: Flask, client: FlaskClient, upload: Any,
                                                  auth: dict[str, str], make_auth: Any) -> None:
    other = make_auth("other")
    first = upload(auth, "shared text " * 20).json
    second = upload(other, "shared text " * 20).json
    tokens = Path(app.config["STORAGE_DIR"]) / "tokens"
    tokens.mkdir()
    cached = [tokens / f"{first['sha256']}-byte-0123.u16", tokens / f"{first['sha256']}-byte-0123.u16.json"]
    unrelated = tokens / f"{'0' * 64}-byte-0123.u16"
    for path in [*cached, unrelated]:
        path.write_bytes(b"\0\0")
    assert client.delete(f"/v1/datasets/{first['id']}", headers=auth).status_code == 204
    assert all(p.exists() for p in cached), "the other key's dataset still uses the content"
    assert client.delete(f"/v1/datasets/{second['id']}", headers=other).status_code == 204
    assert not any(p.exists() for p in cached) and unrelated.exists()
