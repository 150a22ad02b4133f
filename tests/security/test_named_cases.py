"""Bad input, case by case: each row is a request, the status, the envelope code, and the detail
path (or a message fragment) that tells the client what to fix.

The issue's named cases are covered by tests/api with their exact status: malformed JSON 400 and
wrong content type 415 (test_api_jobs::test_malformed_and_wrong_type), unknown spec key and
out-of-range values 422 with the path (test_api_jobs::test_invalid_specs_name_the_field, which also
has the parameter limit as `model` and a dataset too short for seq_len as `dataset_id`), corpus over
the size limit 413 (test_api_datasets::test_upload_too_large_is_413), non-UTF-8 422
(test_api_datasets::test_bad_uploads_are_422_or_415), unknown checkpoint step 404 and Range out of
bounds 416 (test_api_checkpoints). The rows here add what those leave out: the same cases on the
other routes and body kinds, the full envelope, and the hostile inputs found while fuzzing: NUL and
unpaired surrogates (PostgreSQL cannot store NUL, no driver encodes a lone surrogate), JSON nested
past the parser's recursion limit or with a number past Python's digit limit, integers past what a
column holds (SQLite overflows past int64), a cursor naming a non-id. Before the fixes in app/inputs.py,
services/common.py and the schemas, these answered 500 on SQLite, PostgreSQL or both (the int64 spec
value was stored as given).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.fuzz.conftest import CHECKPOINT, Seeded


@dataclass
class Row:
    """One request and what it must answer."""

    name: str
    method: str
    url: str  # {job}, {ds} are filled with real ids of the caller's key
    status: int
    code: str
    path: str | None = None  # a key of error.details
    message: str | None = None  # a fragment of error.message
    body: Any = None  # raw bytes/str, or a dict for multipart
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


ROWS = [
    # named cases on routes and body kinds tests/api does not cover
    Row("malformed JSON on samples", "POST", "/v1/jobs/{job}/samples?wait=0", 400, "bad_request",
        body='{"prompt": '),
    Row("text/plain to samples", "POST", "/v1/jobs/{job}/samples?wait=0", 415, "unsupported_media_type",
        path="content_type", body="hello", content_type="text/plain"),
    Row("no content type to jobs", "POST", "/v1/jobs", 415, "unsupported_media_type", body=b"{}", content_type=None),
    Row("JSON to datasets", "POST", "/v1/datasets", 415, "unsupported_media_type", path="content_type",
        body='{"text": "x"}'),
    Row("unknown key in a sample body", "POST", "/v1/jobs/{job}/samples?wait=0", 422, "validation_error",
        path="colour", body='{"prompt": "x", "colour": "red"}'),
    Row("unknown key three levels deep", "POST", "/v1/jobs", 422, "validation_error",
        path="stabilization.clip.colour", body='{"dataset_id": "{ds}", "stabilization": {"clip": {"colour": 1}}}'),
    Row("out of range, nested", "POST", "/v1/jobs", 422, "validation_error", path="checkpointing.keep_last",
        body='{"dataset_id": "{ds}", "checkpointing": {"keep_last": 0}}'),
    Row("out of range query", "GET", "/v1/jobs/{job}/metrics?limit=5001", 422, "validation_error", path="limit"),
    Row("model over the parameter limit", "POST", "/v1/jobs", 422, "validation_error", path="model",
        message="parameters", body='{"dataset_id": "{ds}", "model": {"arch": "mlp", "context": 512, '
                                   '"d_model": 4096, "hidden": 8192}}'),
    Row("non-UTF-8 multipart upload", "POST", "/v1/datasets", 422, "validation_error", path="file",
        message="UTF-8", body={"file": (b"ok \xc3\x28 bad", "bad.txt")}, content_type="multipart/form-data"),
    Row("non-UTF-8 text/plain upload, truncated sequence", "POST", "/v1/datasets", 422, "validation_error",
        path="file", body=b"ends mid-character \xe2\x82", content_type="text/plain"),
    Row("dataset too short for seq_len", "POST", "/v1/jobs", 422, "validation_error", path="dataset_id",
        message="seq_len", body='{"dataset_id": "{ds}", "training": {"seq_len": 2048, "val_fraction": 0.05}}'),
    Row("sample from a checkpoint step that does not exist", "POST", "/v1/jobs/{job}/samples?wait=0", 404,
        "not_found", message="step 7", body='{"prompt": "x", "step": 7}'),
    Row("download a step that does not exist", "GET", "/v1/jobs/{job}/checkpoints/7/file", 404, "not_found",
        message="step 7", content_type=None),
    Row("Range starting at the file's end", "GET", "/v1/jobs/{job}/checkpoints/100/file", 416,
        "range_not_satisfiable", content_type=None, headers={"Range": "bytes=2048-"}),
    Row("Range with every part out of bounds", "GET", "/v1/jobs/{job}/checkpoints/100/file", 416,
        "range_not_satisfiable", content_type=None, headers={"Range": "bytes=5000-5001"}),
    # envelope for routing errors
    Row("unknown route", "GET", "/v1/nothing-here", 404, "not_found", content_type=None),
    Row("method not allowed", "PUT", "/v1/jobs/{job}", 405, "method_not_allowed", content_type=None),
    Row("JSON array instead of an object", "POST", "/v1/jobs", 422, "validation_error", body="[1, 2]"),
    Row("empty JSON body", "POST", "/v1/jobs", 400, "bad_request", body=b""),
    # hostile text: PostgreSQL cannot store NUL; no driver can encode an unpaired surrogate
    Row("NUL in a spec string", "POST", "/v1/jobs", 422, "validation_error", path="name",
        body='{"dataset_id": "{ds}", "name": "a\\u0000b"}'),
    Row("unpaired surrogate in a prompt", "POST", "/v1/jobs/{job}/samples?wait=0", 422, "validation_error",
        path="prompt", body='{"prompt": "a\\ud800b"}'),
    Row("unpaired surrogate in a key", "POST", "/v1/jobs", 422, "validation_error",
        body='{"dataset_id": "{ds}", "model": {"\\udfff": 1}}'),
    Row("NUL in a dataset id", "POST", "/v1/jobs", 422, "validation_error", path="dataset_id",
        body='{"dataset_id": "ds_\\u0000"}'),
    Row("NUL in a query parameter", "GET", "/v1/jobs/{job}/metrics/layers?layer=a%00b", 422, "validation_error",
        path="layer", content_type=None),
    Row("NUL in a dataset name", "POST", "/v1/datasets?name=a%00", 422, "validation_error", path="name",
        body=b"some text " * 20, content_type="text/plain"),
    Row("NUL in the Idempotency-Key", "POST", "/v1/jobs", 422, "validation_error", path="Idempotency-Key",
        body='{"dataset_id": "{ds}"}', headers={"Idempotency-Key": "a\x00b"}),
    Row("cursor naming a non-id", "GET", "/v1/jobs?cursor=WyIyMDIwLTAxLTAxIiwgIi4uLy4uIl0", 422,
        "validation_error", path="cursor", content_type=None),
    # parser limits
    Row("JSON nested 100,000 deep", "POST", "/v1/jobs", 400, "bad_request", message="nested",
        body="[" * 100_000 + "]" * 100_000),
    Row("a 5,000-digit number", "POST", "/v1/jobs", 400, "bad_request",
        body='{"dataset_id": "{ds}", "training": {"seed": ' + "9" * 5000 + "}}"),
    Row("JSON body over MAX_JSON_BYTES", "POST", "/v1/jobs", 413, "payload_too_large",
        body='{"name": "' + "a" * 1_000_001 + '"}'),
    # integers past what a column holds
    Row("spec integer past int64", "POST", "/v1/jobs", 422, "validation_error", path="training.eval_every",
        body='{"dataset_id": "{ds}", "training": {"eval_every": 18446744073709551616}}'),
    Row("after_step past int32", "GET", "/v1/jobs/{job}/metrics?after_step=9223372036854775807", 422,
        "validation_error", path="after_step", content_type=None),
    Row("after_id past int64", "GET", "/v1/jobs/{job}/events?after_id=99999999999999999999", 422,
        "validation_error", path="after_id", content_type=None),
    Row("sample step past int32", "POST", "/v1/jobs/{job}/samples?wait=0", 422, "validation_error",
        path="step", body='{"prompt": "x", "step": 4294967296}'),
    Row("checkpoint step past int64 in the path", "GET", "/v1/jobs/{job}/checkpoints/99999999999999999999/file",
        404, "not_found", content_type=None),
    Row("NaN in the spec", "POST", "/v1/jobs", 422, "validation_error", path="training.lr",
        body='{"dataset_id": "{ds}", "training": {"lr": NaN}}'),
]


def _send(client: FlaskClient, row: Row, auth: dict[str, str], ids: dict[str, str]) -> Any:
    url = row.url.format(**ids)
    headers = {**auth, **row.headers}
    kwargs: dict[str, Any] = {}
    if isinstance(row.body, dict):  # multipart: {field: (bytes, filename)}
        kwargs["data"] = {k: (io.BytesIO(v[0]), v[1]) for k, v in row.body.items()}
        kwargs["content_type"] = row.content_type
    elif row.body is not None:
        body = row.body.replace("{ds}", ids["ds"]) if isinstance(row.body, str) else row.body
        kwargs["data"] = body
        if row.content_type:
            headers["Content-Type"] = row.content_type
    return client.open(url, method=row.method, headers=headers, **kwargs)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_named_case(seeded: Seeded, row: Row) -> None:
    """One app per backend for all rows (every row is refused, so none changes what the next one sees)."""
    ids = {"job": seeded.ids["job_id"][0], "ds": seeded.ids["dataset_id"][0]}  # the finished job: checkpoint 100
    with _send(seeded.app.test_client(), row, seeded.auth, ids) as response:
        assert response.status_code == row.status, (row.name, response.status_code, response.data[:300])
        assert response.mimetype == "application/json", response.headers
        body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    error = body["error"]
    assert error["code"] == row.code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    if row.path is not None:
        assert row.path in error["details"], error
        assert all(isinstance(m, str) for m in error["details"][row.path]) or row.path == "content_type", error
    if row.message is not None:
        assert row.message in error["message"], error
    if row.status == 416:
        assert response.headers["Content-Range"] == f"bytes */{len(CHECKPOINT)}"
    if row.status == 405:
        assert "GET" in response.headers["Allow"]
