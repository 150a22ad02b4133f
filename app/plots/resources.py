"""GET /v1/jobs/{id}/plots/{name}.png: the dashboard's charts as PNG for reports."""

from __future__ import annotations

from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint

from app.auth import current_owner_id
from app.plots.render import HEIGHT_PX, PLOT_NAMES, WIDTH_PX
from app.plots.service import plot_png
from app.schemas.common import ErrorSchema
from app.services import jobs as jobs_service

blp = Blueprint("plots", __name__, url_prefix="/v1/jobs", description="Plots (PNG)")


@blp.route("/<string:job_id>/plots/<string:name>.png")
class Plot(MethodView):
    @blp.doc(
        parameters=[{"in": "path", "name": "name", "required": True,
                     "schema": {"type": "string", "enum": list(PLOT_NAMES)},
                     "description": "loss (train + validation), grad_norm (before/after clipping, log scale, "
                                    "clip threshold), lr, layers (per-layer gradient norm heatmap)"}],
        responses={
            "200": {"description": f"A {WIDTH_PX}x{HEIGHT_PX} PNG (ETag changes when new steps arrive)",
                    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
            "304": {"description": "Not modified (If-None-Match)"},
            "404": {"description": "Unknown job (or another key's) or unknown plot name",
                    "content": {"application/json": {"schema": ErrorSchema}}},
        },
    )
    def get(self, job_id: str, name: str) -> Response:
        """One plot of a job as PNG, rendered with matplotlib and cached until the series grows."""
        job = jobs_service.get_job(current_owner_id(), job_id)
        png, etag = plot_png(job, name)
        response = Response(png, mimetype="image/png")
        response.set_etag(etag)
        response.headers["Cache-Control"] = "private, no-cache"
        return response.make_conditional(request)
