"""/v1/jobs/{id}/checkpoints and their files."""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any

from flask import Response, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from app.api.checkpoints.schemas import CheckpointListSchema, ExportPendingSchema, ExportQuerySchema
from app.auth import current_owner_id
from app.models import Checkpoint
from app.services import checkpoints as service
from app.services import exports as exports_service
from app.services import jobs as jobs_service
from app.services.storage import send_stored
from stabletrain_export.rules import MEDIA_TYPES, SUFFIXES

blp = Blueprint("checkpoints", __name__, url_prefix="/v1/jobs", description="Checkpoints")


def _view(ckpt: Checkpoint) -> dict[str, Any]:
    val_loss = ckpt.val_loss if ckpt.val_loss is None or math.isfinite(ckpt.val_loss) else None
    return {
        "job_id": ckpt.job_id, "step": ckpt.step, "bytes": ckpt.bytes, "sha256": ckpt.sha256,
        "val_loss": val_loss, "health": ckpt.health, "created_at": ckpt.created_at,
        "download_url": url_for("checkpoints.CheckpointFile", job_id=ckpt.job_id, step=ckpt.step),
    }


def _check_range(size: int) -> None:
    """416 before the file is opened when a Range header cannot be satisfied."""
    if request.range is not None and request.range.range_for_length(size) is None:
        abort(416, message=f"Range not satisfiable for a {size} byte file.",
              headers={"Content-Range": f"bytes */{size}"})


@blp.route("/<string:job_id>/checkpoints")
class Checkpoints(MethodView):
    @blp.response(200, CheckpointListSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """List checkpoints with step, bytes, sha256, val_loss, health and download url."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        return {"items": [_view(c) for c in service.list_checkpoints(job)]}


@blp.route("/<string:job_id>/checkpoints/<int:step>/file")
class CheckpointFile(MethodView):
    @blp.doc(responses={"200": {"description": "The checkpoint file (ETag = sha256; Range supported)",
                                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}}})
    @blp.alt_response(404, response=HTTPStatus(404).name,
                      description="No such job or checkpoint, or its file is no longer stored (pruned or deleted)")
    @blp.alt_response(416, response=HTTPStatus(416).name, description="Range outside the file")
    def get(self, job_id: str, step: int) -> Response:
        """Download a checkpoint file (streamed; ETag and Range)."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        ckpt = service.get_checkpoint(job, step)
        key, info = service.checkpoint_file(ckpt)
        _check_range(info.size)
        try:
            # opened here; once open, a later prune cannot cut the download
            return send_stored(key, mimetype="application/octet-stream",
                               download_name=f"{job.id}_step_{ckpt.step}.pt", etag=ckpt.sha256)
        except FileNotFoundError:  # pruned (keep_last) or deleted since the record was read
            service.gone(ckpt)
            raise  # unreachable


EXPORT_RETRY_AFTER_S = 1


@blp.route("/<string:job_id>/checkpoints/<int:step>/export")
class CheckpointExport(MethodView):
    @blp.arguments(ExportQuerySchema, location="query")
    @blp.doc(responses={"200": {"description": "The export: a .tar.gz of config.json, model.safetensors, "
                                               "generation_config.json and tokenizer files (hf), or a "
                                               ".safetensors file (safetensors)",
                                "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}},
                                            "application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}}})
    @blp.alt_response(202, schema=ExportPendingSchema,
                      description="A worker is writing the export; ask again after Retry-After seconds")
    @blp.alt_response(409, response=HTTPStatus(409).name,
                      description="The spec does not map onto the format (details name the field)")
    def get(self, query: dict[str, Any], job_id: str, step: int) -> Any:
        """Export a checkpoint for Hugging Face (hf) or as weights only (safetensors), made by a worker."""
        fmt = query["format"]
        job = jobs_service.get_job(current_owner_id(), job_id)
        ckpt = service.get_checkpoint(job, step)
        service.checkpoint_file(ckpt)  # 404 once pruned: a worker could not read it either
        exports_service.refuse_unmappable(job, fmt)
        key = exports_service.request_export(ckpt, fmt)
        if exports_service.wait_for_export(key, query["wait"]):
            return send_stored(key, mimetype=MEDIA_TYPES[fmt],
                               download_name=f"{job.id}_step_{ckpt.step}{SUFFIXES[fmt]}", etag=f"{ckpt.sha256}-{fmt}")
        body = {"job_id": job.id, "step": ckpt.step, "format": fmt, "status": "pending",
                "retry_after_s": EXPORT_RETRY_AFTER_S}
        return body, 202, {"Retry-After": str(EXPORT_RETRY_AFTER_S)}
