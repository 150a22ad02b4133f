"""/v1/jobs/{id}/metrics, /metrics/layers and /metrics/activations.

Responses are built as plain dicts and returned without schema serialization (speed: a 1,000-row
page must cost one indexed query); the schemas document the shape in OpenAPI. Every listing pages with
an opaque `cursor` (the previous page's `next_cursor`); `after_step` starts a listing at a step.
"""

from __future__ import annotations

from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.metrics.schemas import (
    ActivationPageSchema,
    ActivationQuerySchema,
    LayerPageSchema,
    LayerQuerySchema,
    StepPageSchema,
    StepQuerySchema,
)
from app.api.utils import json_response
from app.auth import current_owner_id
from app.services import jobs as jobs_service
from app.services import metrics as service

blp = Blueprint("metrics", __name__, url_prefix="/v1/jobs", description="Training metrics")


def _page_doc(what: str, schema: type) -> dict[str, Any]:
    return {"responses": {"200": {"description": what, "content": {"application/json": {"schema": schema}}}}}


@blp.route("/<string:job_id>/metrics")
class StepMetrics(MethodView):
    @blp.arguments(StepQuerySchema, location="query")
    @blp.doc(**_page_doc("A page of step rows", StepPageSchema))
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Per-step series (`cursor` or `after_step` + `limit` paging; `max_points` downsampling keeps spikes
        and NaNs)."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        return json_response(service.step_page(job.id, args["after_step"], args["cursor"], args["limit"],
                                               args["max_points"]))


@blp.route("/<string:job_id>/metrics/layers")
class LayerMetrics(MethodView):
    @blp.arguments(LayerQuerySchema, location="query")
    @blp.doc(**_page_doc("A page of per-layer rows", LayerPageSchema))
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Per-layer gradient norm, weight norm and update ratio over steps, in (step, position, layer) order."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        return json_response(service.layer_page(job.id, args["after_step"], args["cursor"], args["limit"],
                                                args["layer"]))


@blp.route("/<string:job_id>/metrics/activations")
class ActivationMetrics(MethodView):
    @blp.arguments(ActivationQuerySchema, location="query")
    @blp.doc(**_page_doc("A page of activation rows", ActivationPageSchema))
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Activation statistics per site (saturation, dead units, attention logits and entropy, output
        log-sum-exp, gradient through time of recurrent layers), in (step, position, site) order."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        return json_response(service.activation_page(job.id, args["after_step"], args["cursor"], args["limit"],
                                                     args["site"]))
