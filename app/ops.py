"""Operational routes without an API key: /healthz, /readyz, /metrics, /docs."""

from __future__ import annotations

import hmac
from html import escape

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import error_response
from app.observability import registry
from app.services.health import check_broker, check_database, check_storage

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: database, broker and storage (folder or bucket) reachable; 503 naming what is down."""
    checks = {
        "database": check_database(),
        "broker": check_broker(current_app.config["BROKER_URL"], float(current_app.config["BROKER_TIMEOUT_S"])),
        "storage": check_storage(),
    }
    down = sorted(name for name, problem in checks.items() if problem)
    if down:
        details = {name: ("down: " + problem if problem else "ok") for name, problem in checks.items()}
        return error_response(503, f"Not ready: {', '.join(down)} unavailable.", details)
    return jsonify({"status": "ok", "checks": {name: "ok" for name in checks}})


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition; with STABLETRAIN_METRICS_TOKEN set, only for `Bearer <that token>`."""
    token = current_app.config.get("METRICS_TOKEN")
    if token and not _bearer_matches(str(token)):
        return error_response(401, "Metrics need the operator token: send 'Authorization: Bearer <token>'.", {},
                              headers={"WWW-Authenticate": 'Bearer realm="stabletrain-metrics"'})
    return Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST)


def _bearer_matches(token: str) -> bool:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(secret.strip().encode(), token.encode())


@bp.get("/docs")
def docs() -> Response:
    """Local docs page (no CDN): every route plus a link to the OpenAPI document."""
    rows = []
    for rule in sorted(current_app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        methods = ", ".join(sorted(m for m in rule.methods or () if m not in ("HEAD", "OPTIONS")))
        rows.append(f"<tr><td>{escape(methods)}</td><td><code>{escape(rule.rule)}</code></td></tr>")
    html = (
        "<!doctype html><html><head><meta charset='utf-8'><title>StableTrain API</title></head><body>"
        "<h1>StableTrain API v1</h1><p>Machine-readable contract: "
        "<a href='/v1/openapi.json'>/v1/openapi.json</a>. Send <code>Authorization: Bearer &lt;key&gt;</code>.</p>"
        f"<table><tr><th>methods</th><th>path</th></tr>{''.join(rows)}</table></body></html>"
    )
    return Response(html, mimetype="text/html")
