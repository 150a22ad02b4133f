"""Logging setup: plain text, or one JSON object per line with LOG_JSON."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from flask import Flask


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("method", "path", "status", "duration_ms", "job_id", "sample_id"):
            if hasattr(record, key):
                payload[key] = getattr(record, key)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def init_app(app: Flask) -> None:
    """Attach one stream handler to the app and `app.*` loggers."""
    handler = logging.StreamHandler()
    if app.config.get("LOG_JSON") in (True, 1, "1", "true", "True"):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = str(app.config.get("LOG_LEVEL", "INFO")).upper()
    for name in ("app", app.name):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
