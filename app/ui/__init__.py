"""The dashboard (/ui): static pages that call the public /v1 API from the browser with the user's key.

The pages hold no data and need no server-side auth: the browser asks for the API key once (kept in
localStorage; `?key=` sets it and is stripped from the URL) and sends it as `Authorization: Bearer`.
Charts use the vendored uPlot (app/ui/static/vendor/uplot); nothing is loaded from a CDN.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, render_template

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static",
               static_url_path="/static")

# Only this origin: no inline scripts, no CDN (uPlot sets inline styles, hence style-src 'unsafe-inline').
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _page(template: str, **context: str) -> Response:
    response = Response(render_template(template, **context), mimetype="text/html")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Referrer-Policy"] = "no-referrer"  # a ?key= URL must not leak through Referer
    return response


@bp.get("/")
def jobs() -> Response:
    """The list of the key's jobs with their status."""
    return _page("ui/jobs.html", page="jobs")


@bp.get("/jobs/<string:job_id>")
def job(job_id: str) -> Response:
    """One job: charts, layer heatmap, diagnosis, events, checkpoints, sampling."""
    return _page("ui/job.html", page="job", job_id=job_id)


def init_app(app: Flask) -> None:
    """Register the dashboard and the PNG plots API (app.plots)."""
    from app.extensions import api
    from app.plots import blp as plots_blp

    api.register_blueprint(plots_blp)
    app.register_blueprint(bp)
