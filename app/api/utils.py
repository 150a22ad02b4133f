"""Small helpers for views."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, request
from flask_smorest import abort

from app.services.common import without_nonfinite

try:
    import orjson
except ImportError:  # pragma: no cover - optional speed-up
    orjson = None  # type: ignore[assignment]


def job_found_first(view: Callable[..., Any]) -> Callable[..., Any]:
    """404 for another key's (or no) job before the body is read: such ids look absent whatever is sent."""
    from app.auth import current_owner_id
    from app.services.jobs import get_job

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        get_job(current_owner_id(), kwargs["job_id"])
        return view(*args, **kwargs)

    return wrapper


def json_body(view: Callable[..., Any]) -> Callable[..., Any]:
    """415 unless the request body is declared application/json."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not request.is_json:
            abort(415, message="Send the body as application/json.",
                  details={"content_type": request.mimetype or None})
        return view(*args, **kwargs)

    return wrapper


def json_response(payload: Any, status: int = 200) -> Response:
    """Fast JSON response; NaN/Infinity (not JSON) become null."""
    if orjson is not None:  # orjson writes non-finite floats as null by itself
        return Response(orjson.dumps(payload), status=status, mimetype="application/json")
    try:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except ValueError:
        body = json.dumps(without_nonfinite(payload), allow_nan=False, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json")


STORED_KEY_CHARS = 200  # jobs.idempotency_key


def idempotency_key() -> str | None:
    """The request's Idempotency-Key as stored: trimmed, None when absent or blank (app.inputs refuses
    keys over 255 characters). Keys longer than the column are stored as "sha256:" + their digest, so
    every distinct key stays distinct (the column is not widened: on SQLite that means rebuilding the
    jobs table, whose cascading foreign keys would empty the metrics tables)."""
    key = (request.headers.get("Idempotency-Key") or "").strip()
    if len(key) > STORED_KEY_CHARS:
        return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()
    return key or None


def request_body_hash() -> str:
    """sha256 hex of the canonical JSON body (keys sorted, no spaces): what an idempotent replay must repeat.

    Key order and whitespace do not make two bodies different; any changed value does."""
    canonical = json.dumps(request.get_json(silent=True), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
