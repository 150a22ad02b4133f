"""One error envelope for every failure: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, current_app, jsonify
from flask_limiter.errors import RateLimitExceeded
from werkzeug.exceptions import HTTPException, InternalServerError

from stabletrain_storage import StorageError

log = logging.getLogger(__name__)

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}

# headers of an HTTPException worth keeping (Allow on 405, Content-Range on 416, ...)
_KEEP_HEADERS = {"allow", "content-range", "retry-after", "www-authenticate"}


def flatten_messages(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """Nested marshmallow messages -> {"model.n_layers": ["..."]}."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten_messages(value, path))
    elif isinstance(messages, (list, tuple)) and all(isinstance(m, str) for m in messages):
        out[prefix or "_schema"] = list(messages)
    elif isinstance(messages, (list, tuple)):
        for value in messages:
            out.update(flatten_messages(value, prefix))
    else:
        out[prefix or "_schema"] = [str(messages)]
    return out


def error_response(status: int, message: str, details: dict[str, Any] | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """Build the envelope response."""
    body = {"error": {"code": code or CODES.get(status, "error"), "message": message, "details": details or {}}}
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _webargs_details(data: dict[str, Any]) -> dict[str, Any]:
    """Validation messages from webargs ({"json": {...}}) without the location level."""
    messages = data.get("errors") or data.get("messages") or {}
    if isinstance(messages, dict) and set(messages) <= {"json", "query", "querystring", "form", "files", "headers", "view_args"}:
        merged: dict[str, Any] = {}
        for value in messages.values():
            merged.update(flatten_messages(value))
        return merged
    return flatten_messages(messages)


def handle_http_exception(error: HTTPException) -> Response:
    """Render any HTTPException (abort, webargs, limiter, werkzeug) as the envelope."""
    status = error.code or 500
    if status >= 500 and isinstance(error, InternalServerError) and error.original_exception is not None:
        return handle_unexpected(error.original_exception)
    data = getattr(error, "data", None) or {}
    headers = {k: v for k, v in error.get_headers() if k.lower() in _KEEP_HEADERS}
    headers.update(data.get("headers") or {})
    details: dict[str, Any] = dict(data.get("details") or {})
    if status in (400, 422) and ("messages" in data or "errors" in data):
        details = _webargs_details(data)
    message = data.get("message") or _default_message(error, status)
    if status == 429 and "Retry-After" not in headers:
        headers["Retry-After"] = str(retry_after_s(error, data))
    return error_response(status, message, details, data.get("code"), headers)


def retry_after_s(error: HTTPException, data: dict[str, Any]) -> int:
    """Seconds until a 429's limit lets the request through: the limiter's window reset when it is the
    limiter's 429 (its own header is X-RateLimit-Retry-After, see app.config), else the error's own value."""
    limiter = current_app.extensions.get("stabletrain_limiter")
    current = getattr(limiter, "current_limit", None) if isinstance(error, RateLimitExceeded) else None
    if current is not None:
        return max(1, int(current.reset_at - time.time()))  # as Flask-Limiter counts it (reset_at is whole seconds)
    return int(data.get("retry_after", 60))


def _default_message(error: HTTPException, status: int) -> str:
    if status == 400 and "messages" in (getattr(error, "data", None) or {}):
        return "Malformed request body."
    if status == 422:
        return "Validation failed."
    if status == 429:
        return f"Rate limit exceeded ({error.description})."
    return error.description or error.name


def handle_unexpected(error: BaseException) -> Response:
    """Log the traceback; answer 500 without it."""
    log.error("unhandled error", exc_info=error)
    return error_response(500, "Internal server error.")


def handle_storage_error(error: StorageError) -> Response:
    """The bucket could not be reached: 503 (retry later); nothing was recorded without its object."""
    log.error("storage unavailable", exc_info=error)
    return error_response(503, "Storage is unavailable; try again shortly.", code="storage_unavailable",
                          headers={"Retry-After": "5"})


def register_error_handlers(app: Flask) -> None:
    """Install the envelope for HTTP errors and unexpected exceptions (after flask-smorest's own)."""
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(StorageError, handle_storage_error)
    app.register_error_handler(Exception, handle_unexpected)
