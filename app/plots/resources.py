"""GET /v1/jobs/{id}/plots/{name}.png: the dashboard's charts as PNG for reports.

One rule per plot name (loss, grad_norm, lr, layers, activations, grad_time) rather than a `<name>` path parameter: every
/v1 rule then resolves with nothing but the job id, an unknown name is a plain 404 in the error
envelope, and the OpenAPI document lists each plot with its own description.
"""

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

DESCRIPTIONS = {
    "loss": "Training loss per step and validation loss at each evaluation; non-finite/skipped steps marked.",
    "grad_norm": "Global gradient norm before and after clipping (log scale) with the clip threshold "
                 "(stabilization.clip.max_norm when clipping by norm).",
    "lr": "Learning rate per step.",
    "layers": "Per-layer gradient norm heatmap (log10; layers from input to output, steps as columns; "
              "NaN/inf cells in red).",
    "activations": "Activation heatmap, sites from input to output: the saturated fraction of tanh/sigmoid "
                   "outputs (or, for a job without such sites, the dead fraction of ReLU-family units), "
                   "largest per step bucket, on a 0..1 scale.",
    "grad_time": "Gradient through time of each recurrent layer: norm(t=0) / norm(t=T-1) over steps (log "
                 "scale; far below 1 means gradients vanish through time). A line per layer, the band is "
                 "the min..max per step bucket.",
}
assert set(DESCRIPTIONS) == set(PLOT_NAMES)

RESPONSES = {
    "200": {"description": f"A {WIDTH_PX}x{HEIGHT_PX} PNG; the ETag changes when new steps arrive",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    "304": {"description": "Not modified (If-None-Match)"},
    "404": {"description": "No such job for this key", "content": {"application/json": {"schema": ErrorSchema}}},
}


def _png(job_id: str, name: str) -> Response:
    job = jobs_service.get_job(current_owner_id(), job_id)
    png, etag = plot_png(job, name)
    response = Response(png, mimetype="image/png")
    response.set_etag(etag)
    response.headers["Cache-Control"] = "private, no-cache"
    return response.make_conditional(request)


def _plot_view(name: str) -> type[MethodView]:
    def get(self: MethodView, job_id: str) -> Response:
        return _png(job_id, name)

    get.__doc__ = (f"{name}.png: {DESCRIPTIONS[name]}\n\nAggregated in SQL (min/max/last per step bucket, at "
                   f"most about one bucket per pixel, so spikes stay visible), rendered with matplotlib and cached "
                   f"until the series grows.")
    view = type(f"Plot_{name}", (MethodView,), {"get": blp.doc(responses=RESPONSES)(get)})
    return blp.route(f"/<string:job_id>/plots/{name}.png", endpoint=f"plot_{name}")(view)


PLOT_VIEWS = {name: _plot_view(name) for name in PLOT_NAMES}
