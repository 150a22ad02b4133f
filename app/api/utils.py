"""Small helpers for views."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import request
from flask_smorest import abort


def json_body(view: Callable[..., Any]) -> Callable[..., Any]:
    """415 unless the request body is declared application/json."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not request.is_json:
            abort(415, message="Send the body as application/json.",
                  details={"content_type": request.mimetype or None})
        return view(*args, **kwargs)

    return wrapper
