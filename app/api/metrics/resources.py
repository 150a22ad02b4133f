"""/v1/jobs/{id}/metrics and /metrics/layers.

Responses are built as plain dicts and returned without schema serialization (speed: a 1,000-row
page must cost one indexed query); the schemas document the shape in OpenAPI.
"""

from __future__ import annotations

from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.metrics.schemas import LayerPageSchema, LayerQuerySchema, StepPageSchema, StepQuerySchema
from app.api.utils import json_response
from app.auth import current_owner_id
from app.services import jobs as jobs_service
from app.services import metrics as service

blp = Blueprint("metrics", __name__, url_prefix="/v1/jobs", description="Training metrics")


@blp.route("/<string:job_id>/metrics")
class StepMetrics(MethodView):
    @blp.arguments(StepQuerySchema, location="query")
    @blp.doc(responses={"200": {"description": "A page of step rows",
                                "content": {"application/json": {"schema": StepPageSchema}}}})
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Per-step series (`after_step`/`limit` paging; `max_points` downsampling keeps spikes and NaNs)."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        return json_response(service.step_page(job.id, args["after_step"], args["limit"], args["max_points"]))


@blp.route("/<string:job_id>/metrics/layers")
class LayerMetrics(MethodView):
    @blp.arguments(LayerQuerySchema, location="query")
    @blp.doc(responses={"200": {"description": "A page of per-layer rows",
                                "content": {"application/json": {"schema": LayerPageSchema}}}})
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Per-layer gradient norm, weight norm and update ratio over steps."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        return json_response(service.layer_page(job.id, args["after_step"], args["limit"], args["layer"]))
