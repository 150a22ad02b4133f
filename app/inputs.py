"""Input hygiene before any view runs: JSON bodies that parse safely, text the databases can store.

PostgreSQL cannot store NUL in text, and no driver can encode an unpaired UTF-16 surrogate (which a
JSON `\\ud800` escape produces), so such strings would fail deep in a query as a 500. They are
answered here instead, with the field path: 422 for a JSON field, a query parameter or the
Idempotency-Key header (over MAX_IDEMPOTENCY_KEY characters: 400, never cut). A JSON body nested too deeply for the parser, or with a number too long to
convert, is malformed (400), like any body that is not JSON. JSON bodies are small (job specs, sample
prompts): over MAX_JSON_BYTES they answer 413.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Flask, current_app, request
from flask_smorest import abort
from werkzeug.exceptions import RequestEntityTooLarge

BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
MAX_IDEMPOTENCY_KEY = 255
BAD_TEXT_MESSAGE = "must not contain NUL characters or unpaired surrogates"
MAX_PATHS = 20


def bad_text_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the strings (keys included) in JSON-like data that contain NUL or a lone surrogate."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack and len(found) < MAX_PATHS:
        path, item = stack.pop()
        if isinstance(item, str):
            if BAD_TEXT.search(item):
                found.append(path or "_schema")
        elif isinstance(item, dict):
            for key, child in item.items():
                key_text = str(key)
                child_path = f"{path}.{BAD_TEXT.sub('?', key_text)}" if path else BAD_TEXT.sub("?", key_text)
                if BAD_TEXT.search(key_text):
                    found.append(child_path)
                stack.append((child_path, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), child) for i, child in enumerate(item))
    return sorted(found)


def _reject(paths: list[str]) -> None:
    abort(422, message=f"Validation failed: text {BAD_TEXT_MESSAGE}.",
          details={path: [f"Text {BAD_TEXT_MESSAGE}."] for path in paths})


def _check_json_body() -> None:
    limit = int(current_app.config["MAX_JSON_BYTES"])
    if request.content_length is not None and request.content_length > limit:
        abort(413, message=f"JSON body exceeds the {limit} byte limit.")
    request.max_content_length = limit  # a chunked body stops being read past the limit
    try:
        raw = request.get_data(cache=True)  # kept for webargs, which parses it again
    except RequestEntityTooLarge:
        abort(413, message=f"JSON body exceeds the {limit} byte limit.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        abort(400, message="Malformed JSON body: nested too deeply.", details={"json": ["Invalid JSON body."]})
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number over Python's digit limit
        abort(400, message=f"Malformed JSON body: {str(exc).splitlines()[0][:200]}.",
              details={"json": ["Invalid JSON body."]})
    paths = bad_text_paths(data)
    if paths:
        _reject(paths)


def check_inputs() -> None:
    """before_request (after auth and the rate limiter)."""
    paths = [name for name, value in request.args.items(multi=True) if BAD_TEXT.search(name) or BAD_TEXT.search(value)]
    if paths:
        _reject(sorted({BAD_TEXT.sub("?", p) for p in paths}))
    key = request.headers.get("Idempotency-Key")
    if key is not None and BAD_TEXT.search(key):
        _reject(["Idempotency-Key"])
    if key is not None and len(key.strip()) > MAX_IDEMPOTENCY_KEY:  # never cut: two keys must not become one
        abort(400, message=f"Idempotency-Key is {len(key.strip())} characters; at most {MAX_IDEMPOTENCY_KEY} "
                           "are allowed.",
              details={"Idempotency-Key": [f"Longer than {MAX_IDEMPOTENCY_KEY} characters."]})
    if request.method in ("POST", "PUT", "PATCH") and request.is_json:
        _check_json_body()


def init_app(app: Flask) -> None:
    """Register the hook; call after auth and the limiter so 401 and 429 come first."""
    app.config.setdefault("MAX_JSON_BYTES", 1_000_000)
    app.before_request(check_inputs)
