"""Small helpers for views."""

from __future__ import annotations

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
