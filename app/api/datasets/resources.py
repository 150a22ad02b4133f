"""/v1/datasets."""

from __future__ import annotations

from typing import Any

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from app.api.datasets.schemas import DatasetListQuerySchema, DatasetPageSchema, DatasetSchema
from app.auth import current_owner_id
from app.models import Dataset
from app.services import datasets as service

blp = Blueprint("datasets", __name__, url_prefix="/v1/datasets", description="Text corpora")

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary", "minLength": 1},
                                   "name": {"type": "string"}},
                    "required": ["file"],
                }
            },
            "text/plain": {"schema": {"type": "string", "minLength": 1}},
        },
    }
}


def _upload() -> Dataset:
    # Both paths hand the service a stream it reads in chunks: request.stream is the socket (bounded by
    # MAX_CONTENT_LENGTH), and Werkzeug's form parser spools a multipart file past 500 kB to a temp file.
    owner = current_owner_id()
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            abort(422, message="Missing multipart field 'file'.", details={"file": ["Missing data for required field."]})
        name = request.form.get("name") or upload.filename
        return service.create_dataset(owner, upload.stream, name)
    if request.mimetype == "text/plain":
        return service.create_dataset(owner, request.stream, request.args.get("name"))
    abort(415, message="Upload a multipart 'file' field or a text/plain body.",
          details={"content_type": request.mimetype or None})
    raise AssertionError  # unreachable


@blp.route("")
class Datasets(MethodView):
    @blp.arguments(DatasetListQuerySchema, location="query")
    @blp.response(200, DatasetPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List datasets, newest first (cursor paged)."""
        items, cursor = service.list_datasets(current_owner_id(), args["limit"], args["cursor"])
        return {"items": items, "next_cursor": cursor}

    @blp.doc(**UPLOAD_DOC)
    @blp.response(201, DatasetSchema)
    def post(self) -> Dataset:
        """Upload a UTF-8 text corpus (multipart `file` or text/plain body; optional `name`).

        The body streams to storage in chunks, hashed and UTF-8 checked on the way, so any size up to the
        server's limit (`STABLETRAIN_MAX_DATASET_BYTES`, default 1 GiB) is fine. Over the limit or the
        key's quota: 413; invalid UTF-8: 422 naming the byte offset; either way nothing is stored.
        """
        return _upload()


@blp.route("/<string:dataset_id>")
class DatasetById(MethodView):
    @blp.response(200, DatasetSchema)
    def get(self, dataset_id: str) -> Dataset:
        """Read one dataset."""
        return service.get_dataset(current_owner_id(), dataset_id)

    @blp.response(204)
    @blp.alt_response(409, response="CONFLICT", description="A live job uses the dataset")
    def delete(self, dataset_id: str) -> None:
        """Delete a dataset (409 while a live job uses it)."""
        service.delete_dataset(current_owner_id(), dataset_id)
